"""Function-preserving depth growth of the reference CLIP's image tower.

The 4-block, 96-wide tower stopped improving on the held-out family (about 68% single-object
zero-shot) halfway through the 6.3 M scenes of v7 and v8, while it names only 78.5% of fresh
scenes of its own training family: it underfits. Training a deeper tower from scratch would
throw away what it learned. Inserting blocks whose residual branches start at zero (attention
and MLP output projections zeroed, everything else freshly initialised) gives a deeper tower that
computes exactly the same function; the zeroed projections get non-zero gradients at once (their
inputs are not zero), so the new blocks start learning from the first step.
"""

from __future__ import annotations

import re

import torch

BLOCK_PREFIX = "visual.transformer.resblocks."
#: Parameters that write into the residual stream: zeroed, a new block is the identity.
RESIDUAL_OUTPUTS = (
    "attn.out_proj.weight",
    "attn.out_proj.bias",
    "mlp.c_proj.weight",
    "mlp.c_proj.bias",
)
_BLOCK_KEY = re.compile(re.escape(BLOCK_PREFIX) + r"(\d+)\.(.+)")


def tower_depth(state: dict[str, torch.Tensor]) -> int:
    """Number of image-tower blocks in a reference model's ``state``."""
    indices = {int(m.group(1)) for k in state if (m := _BLOCK_KEY.fullmatch(k))}
    return max(indices) + 1 if indices else 0


def block_layout(old_layers: int, new_layers: int) -> list[int | None]:
    """For each block of the grown tower: the old block it keeps, or ``None`` for a new one.

    New blocks fill the gaps between old blocks as evenly as possible (earlier gaps first) and
    never go after the last old block, so the tower still ends with the block whose LeGrad map
    MaskInversion and the pointing game read (a new last block would give a zero map at first).
    """
    if old_layers < 1 or new_layers < old_layers:
        raise ValueError(f"can only grow a tower: {old_layers} -> {new_layers} blocks")
    extra = new_layers - old_layers
    gaps = max(old_layers - 1, 1)
    layout: list[int | None] = []
    for old in range(old_layers):
        if old_layers == 1:
            layout.extend([None] * extra)
        layout.append(old)
        if old < old_layers - 1:
            layout.extend([None] * (extra // gaps + (old < extra % gaps)))
    return layout


def grow_state(
    saved: dict[str, torch.Tensor], fresh: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``saved`` (a trained state) with identity blocks inserted to the depth of ``fresh``.

    ``fresh`` is the state of a newly built model at the new depth: its non-block parameters are
    ignored (``saved``'s are kept), its blocks initialise the new ones, with
    :data:`RESIDUAL_OUTPUTS` zeroed. Old blocks are renumbered by :func:`block_layout`.
    """
    old_layers, new_layers = tower_depth(saved), tower_depth(fresh)
    grown = {k: v for k, v in saved.items() if not _BLOCK_KEY.fullmatch(k)}
    for position, old in enumerate(block_layout(old_layers, new_layers)):
        target = f"{BLOCK_PREFIX}{position}."
        if old is not None:
            source = f"{BLOCK_PREFIX}{old}."
            grown.update(
                {target + k[len(source) :]: v for k, v in saved.items() if k.startswith(source)}
            )
            continue
        for key, value in fresh.items():
            if key.startswith(target):
                name = key[len(target) :]
                grown[key] = torch.zeros_like(value) if name in RESIDUAL_OUTPUTS else value.clone()
    return grown
