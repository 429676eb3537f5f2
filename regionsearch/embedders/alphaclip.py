"""Alpha-CLIP (Sun et al., CVPR 2024): a CLIP image tower with a second, alpha-channel input.

The patch embedding becomes ``conv1(rgb) + conv1_alpha(alpha)``, where ``conv1_alpha`` is a
``Conv2d(1, width, patch, stride=patch, bias=False)`` and ``alpha = (mask - 0.5) / 0.26`` is the
mask resized exactly like the image (square resize, no crop: the official preprocessing
centre-crops the image but not the mask, which misaligns them). Everything after the patch
embedding is the ordinary ViT, run by the backbone's :class:`ViTRunner`; the text tower stays the
backbone's.

Weights, in order of precedence:

1. ``checkpoint=path``: an official Alpha-CLIP visual checkpoint (``.pth``/``.pt`` or
   ``.safetensors``, OpenAI-CLIP key names, see :func:`map_alphaclip_keys`);
2. the bundled file ``<folder>/<backbone.name>-alphaclip.safetensors`` when the backbone was
   loaded from a folder (``backbone.extra["folder"]``) that holds one;
3. none: ``conv1_alpha`` is zero and the backbone's own tower is used, so the embedding is the
   plain image embedding whatever the mask (useful only as a control; a warning says so).

Fine-tuned weights go into a deep copy of the backbone's image tower: the user's model is never
modified, and other embedders on the same backbone keep seeing the original weights. The released
checkpoints fine-tune OpenAI's CLIP, so pair them with an OpenAI backbone (e.g.
``Backbone.load("ViT-B-16/openai")``) whose text tower they were trained against.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import nn

from regionsearch.backbone import Backbone, ViTRunner, resize_masks
from regionsearch.embedders.base import RegionEmbedder, check_positive, check_resolution
from regionsearch.errors import BackboneLoadError

LOG = logging.getLogger(__name__)

#: Alpha normalisation of the official code: ``Normalize(0.5, 0.26)`` on a [0, 1] mask.
ALPHA_MEAN = 0.5
ALPHA_STD = 0.26
ALPHA_KEY = "conv1_alpha.weight"
_IN_PROJ = re.compile(r"\.attn\.in_proj\.(weight|bias)$")


# ---------------------------------------------------------------------- weights
def map_alphaclip_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an Alpha-CLIP visual state dict to the key names of an open_clip image tower.

    Rules, applied in order:

    1. a leading ``module.`` (checkpoints saved from DistributedDataParallel) is dropped;
    2. if any key starts with ``visual.``, only those keys are kept, without the prefix (a full
       CLIP state dict's text tower and ``logit_scale`` are ignored: the text tower stays the
       backbone's);
    3. ``transformer.resblocks.N.attn.in_proj.weight|bias`` (Alpha-CLIP stores the fused QKV
       projection as an ``nn.Linear``) becomes ``...attn.in_proj_weight|in_proj_bias`` (the
       ``nn.MultiheadAttention`` parameters open_clip uses).

    Every other OpenAI-CLIP name (``conv1.weight``, ``conv1_alpha.weight``, ``class_embedding``,
    ``positional_embedding``, ``ln_pre.*``, ``attn.out_proj.*``, ``ln_1/ln_2``,
    ``mlp.c_fc/c_proj``, ``ln_post.*``, ``proj``) is already open_clip's. The mapping is
    idempotent, so state dicts already in open_clip naming pass through unchanged.
    """
    items = [(k.removeprefix("module."), v) for k, v in state.items()]
    if any(k.startswith("visual.") for k, _ in items):
        items = [(k.removeprefix("visual."), v) for k, v in items if k.startswith("visual.")]
    return {_IN_PROJ.sub(r".attn.in_proj_\1", k): v for k, v in items}


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a torch checkpoint (tensors only, no pickled code).

    A checkpoint that wraps its weights under ``state_dict`` or ``model`` is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise BackboneLoadError(f"Alpha-CLIP checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt file, pickled objects, wrong format
        raise BackboneLoadError(f"could not read Alpha-CLIP checkpoint {path}: {exc}") from exc
    for wrapper in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise BackboneLoadError(f"{path} does not hold a state dict of tensors")
    return dict(state)


def _listing(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return f"{shown}, … ({len(keys)} in all)" if len(keys) > limit else shown


def load_alphaclip_visual(
    visual: nn.Module, state: Mapping[str, torch.Tensor], source: str
) -> torch.Tensor:
    """Load a mapped Alpha-CLIP state dict into ``visual`` (in place) and return the alpha weight.

    ``visual`` must be a copy the caller owns. Keys must match exactly (the tower's own keys plus
    ``conv1_alpha.weight``) with the same shapes: a checkpoint for another architecture or
    resolution is refused with the first few offending names, rather than half-loaded.
    Values are cast to the tower's dtype and device. Returns ``(width, 1, patch, patch)``.
    """
    own = visual.state_dict()
    expected = [*own, ALPHA_KEY]
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in own and k != ALPHA_KEY]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_listing(unexpected)}")
        raise BackboneLoadError(
            f"{source} is not an Alpha-CLIP checkpoint for this backbone's image tower ("
            + "; ".join(parts)
            + ")"
        )
    conv1 = visual.conv1
    alpha_shape = (conv1.out_channels, 1, *conv1.kernel_size)
    shapes = {**{k: tuple(v.shape) for k, v in own.items()}, ALPHA_KEY: alpha_shape}
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {shapes[k]}"
        for k in expected
        if tuple(state[k].shape) != shapes[k]
    ]
    if wrong:
        raise BackboneLoadError(
            f"{source} does not fit this backbone's image tower (checkpoint vs model shapes: "
            f"{_listing(wrong, 3)}); use the architecture and resolution it was trained for"
        )
    visual.load_state_dict({k: state[k] for k in own}, strict=True)  # casts to the tower's dtype
    return state[ALPHA_KEY].to(device=conv1.weight.device, dtype=conv1.weight.dtype)


def bundled_alphaclip_file(backbone: Backbone) -> Path | None:
    """``<folder>/<name>-alphaclip.safetensors`` for a backbone loaded from a folder, if present."""
    folder = backbone.extra.get("folder")
    if folder is None:
        return None
    path = Path(folder) / f"{backbone.name}-alphaclip.safetensors"
    return path if path.is_file() else None


# ---------------------------------------------------------------------- embedder
class AlphaCLIP(RegionEmbedder):
    """Alpha-CLIP region embeddings: one forward pass per mask, the image repeated per mask.

    Args:
        backbone: the frozen CLIP; its text tower embeds the queries.
        checkpoint: path of an official Alpha-CLIP visual checkpoint (see module docstring for
            the fallbacks when omitted).
        resolution: square input size (default: the model's native size; the alpha map is
            resized to the same size).
        batch_size: masks per forward pass (each one a full copy of the image's tokens).
    """

    name = "alphaclip"

    def __init__(
        self,
        backbone: Backbone,
        *,
        checkpoint: str | Path | None = None,
        resolution: int | None = None,
        batch_size: int = 32,
    ) -> None:
        super().__init__(backbone)
        self.resolution = check_resolution(backbone, resolution)
        self.batch_size = check_positive("batch_size", batch_size)
        base = backbone.model.visual
        width, patch = base.conv1.out_channels, base.conv1.kernel_size
        # skip_init: no random init (it would draw from, and advance, the global RNG).
        self.conv1_alpha = nn.utils.skip_init(
            nn.Conv2d,
            1,
            width,
            patch,
            stride=patch,
            bias=False,
            device=base.conv1.weight.device,
            dtype=base.conv1.weight.dtype,
        )
        self.conv1_alpha.requires_grad_(False)

        source = Path(checkpoint) if checkpoint is not None else bundled_alphaclip_file(backbone)
        if source is None:
            nn.init.zeros_(self.conv1_alpha.weight)
            self.runner: ViTRunner = backbone.vit
            self.weights = "none (zero alpha: masks are ignored)"
            LOG.warning(
                "alphaclip on %s has no Alpha-CLIP weights: conv1_alpha is zero, so every mask "
                "gets the whole image's embedding; pass checkpoint=... for real region embeddings",
                backbone.name,
            )
            return
        visual = copy.deepcopy(base)
        state = map_alphaclip_keys(read_state_dict(source))
        with torch.no_grad():
            self.conv1_alpha.weight.copy_(load_alphaclip_visual(visual, state, str(source)))
        visual.eval().requires_grad_(False)
        self.runner = ViTRunner(visual)
        self.weights = str(source) if checkpoint is not None else f"bundled:{source.name}"

    def alpha_maps(self, masks: torch.Tensor) -> torch.Tensor:
        """``(M, H, W)`` masks in [0, 1] → ``(M, 1, S, S)`` normalised alpha at the input size.

        Square-resized like the image (area averaging when shrinking), so soft edges stay soft
        as in Alpha-CLIP's training data.
        """
        resized = resize_masks(masks.to(self.device), self.resolution)
        alpha = (resized - ALPHA_MEAN) / ALPHA_STD
        return alpha[:, None].to(self.conv1_alpha.weight.dtype)

    @torch.no_grad()
    def _embed(self, image: np.ndarray, masks: torch.Tensor) -> torch.Tensor:
        pixels = self.backbone.preprocess(image, self.resolution)  # (3, S, S)
        out = []
        for chunk in masks.split(self.batch_size):
            alpha = self.alpha_maps(chunk)  # (m, 1, S, S)
            batch = pixels.expand(alpha.shape[0], -1, -1, -1)  # (m, 3, S, S), a view
            out.append(self.runner.encode(batch, self.conv1_alpha(alpha)))
        return torch.cat(out)

    def describe(self) -> dict[str, object]:
        return {
            **super().describe(),
            "weights": self.weights,
            "resolution": self.resolution,
            "batch_size": self.batch_size,
        }


__all__ = [
    "AlphaCLIP",
    "bundled_alphaclip_file",
    "load_alphaclip_visual",
    "map_alphaclip_keys",
    "read_state_dict",
]
