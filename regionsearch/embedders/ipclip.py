"""IP-CLIP (MAFT, Jiao et al., NeurIPS 2023): many masks in one forward pass via attention masks.

Blocks ``0 .. start_block-1`` run normally on ``[CLS, patch_1 .. patch_P]``. From ``start_block``
on, the class token is replicated once per mask and the sequence becomes
``[cls_1 .. cls_m, patch_1 .. patch_P]`` with an additive attention mask (``0`` = may attend,
``-inf`` = blocked), the same for every head:

=============  ===========================  =================================
query \\ key    ``cls_1 .. cls_m``           ``patch_1 .. patch_P``
=============  ===========================  =================================
``cls_i``      only itself (diagonal)       patches selected for mask ``i``
``patch_p``    blocked                      all patches
=============  ===========================  =================================

So the patch stream never sees a class token (it is the same whatever the masks, and differs from
the ordinary forward, where patches also attend to CLS), and each ``cls_i`` pools only its
region. The output for mask ``i`` is ``ln_post(cls_i) @ proj`` (:meth:`ViTRunner.head`).

Patch selection: each mask is area-resized to the patch grid (the fraction of each patch it
covers) and thresholded at ``threshold`` (``>=``, default 0.5). A mask that covers no patch that
much (a small object, a thin structure) falls back to the patch(es) with the largest coverage,
ties included, instead of an empty row, which would leave ``cls_i`` attending only to itself and
describing nothing of the image.

Masks are processed in chunks of ``chunk_size``: each chunk reruns the (mask-independent) patch
stream, which bounds the attention matrix at ``(chunk_size + P)^2`` per head and leaves results
independent of the chunking.

Weights: the attention-masking forward is training-free with the backbone's plain CLIP weights,
which makes it a fair baseline. MAFT's fine-tuned IP-CLIP weights are ordinary CLIP weights: save
the CLIP part of their checkpoint as a state dict in OpenAI/open_clip naming (``visual.*``,
``transformer.*``, ``token_embedding.weight``, ...) and load it as the backbone, e.g.
``Backbone.load("ViT-B-16-quickgelu", pretrained="/path/ipclip-vit-b16.pt")`` (OpenAI-based
weights need the QuickGELU variant of the architecture); this embedder then uses that backbone
as it is.
"""

from __future__ import annotations

import numpy as np
import torch

from regionsearch.backbone import Backbone, resize_masks
from regionsearch.embedders.base import RegionEmbedder, check_positive, check_resolution


def select_patches(coverage: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """``(m, P)`` per-patch mask coverage in [0, 1] → ``(m, P)`` bool: patches each CLS may see.

    ``coverage >= threshold``; rows left empty fall back to their maximum-coverage patch(es).
    """
    allowed = coverage >= threshold
    empty = ~allowed.any(dim=1)
    if empty.any():
        rows = coverage[empty]
        allowed[empty] = rows == rows.amax(dim=1, keepdim=True)
    return allowed


def ipclip_attention_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(m, P)`` bool patch selection → ``(m + P, m + P)`` additive attention mask.

    Row/column order is ``[cls_1 .. cls_m, patch_1 .. patch_P]``; see the module docstring for
    the layout. No row is fully blocked (every CLS sees itself, every patch the patches), so the
    softmax is always defined. Broadcasts over batch and heads.
    """
    m, num_patches = allowed.shape
    visible = torch.zeros(m + num_patches, m + num_patches, dtype=torch.bool, device=allowed.device)
    visible[:m, :m] = torch.eye(m, dtype=torch.bool, device=allowed.device)
    visible[:m, m:] = allowed
    visible[m:, m:] = True
    mask = torch.zeros(visible.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~visible, float("-inf"))


class IPCLIP(RegionEmbedder):
    """MAFT's IP-CLIP forward: one pass per image (per chunk of masks), any number of masks.

    Args:
        backbone: the frozen CLIP (plain weights, or MAFT's fine-tuned ones loaded as the backbone).
        start_block: first block run with per-mask class tokens (default ``2 * blocks // 3``,
            8 of 12 as in MAFT); ``0 .. blocks``.
        threshold: minimum fraction of a patch a mask must cover for its CLS to attend to it.
        chunk_size: masks per pass.
        resolution: square input size (default: the model's native size).
    """

    name = "ipclip"

    def __init__(
        self,
        backbone: Backbone,
        *,
        start_block: int | None = None,
        threshold: float = 0.5,
        chunk_size: int = 128,
        resolution: int | None = None,
    ) -> None:
        super().__init__(backbone)
        depth = len(backbone.vit.blocks)
        self.start_block = depth * 2 // 3 if start_block is None else int(start_block)
        if not 0 <= self.start_block <= depth:
            raise ValueError(f"start_block must lie in 0..{depth}, got {start_block}")
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold must lie in (0, 1], got {threshold}")
        self.threshold = float(threshold)
        self.chunk_size = check_positive("chunk_size", chunk_size)
        self.resolution = check_resolution(backbone, resolution)

    def patch_selection(self, masks: torch.Tensor) -> torch.Tensor:
        """``(m, H, W)`` masks → ``(m, P)`` bool, P = patches of the grid at ``resolution``.

        Area resizing straight to the grid gives each patch's covered fraction, in the same
        square-resized frame as the pixels.
        """
        grid = self.backbone.vit.grid_for(self.resolution, self.resolution)
        coverage = resize_masks(masks.to(self.device), grid).flatten(1)
        return select_patches(coverage, self.threshold)

    def masked_forward(self, tokens: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """Run blocks ``start_block ..`` with one CLS per mask.

        Args:
            tokens: ``(1, 1 + P, C)`` tokens entering ``start_block`` (CLS first).
            allowed: ``(m, P)`` bool patch selection.

        Returns:
            ``(1, m + P, C)`` tokens after the last block, ``[cls_1 .. cls_m, patches]``.
        """
        m = allowed.shape[0]
        cls = tokens[:, :1].expand(-1, m, -1)
        sequence = torch.cat([cls, tokens[:, 1:]], dim=1)
        mask = ipclip_attention_mask(allowed.to(sequence.device), sequence.dtype)
        return self.backbone.vit.run_blocks(sequence, self.start_block, None, mask)

    @torch.no_grad()
    def _embed(self, image: np.ndarray, masks: torch.Tensor) -> torch.Tensor:
        vit = self.backbone.vit
        pixels = self.backbone.preprocess(image, self.resolution)[None]  # (1, 3, S, S)
        tokens = vit.run_blocks(vit.embed(pixels), 0, self.start_block)  # (1, 1 + P, C)
        out = []
        for chunk in masks.split(self.chunk_size):
            allowed = self.patch_selection(chunk)  # (m, P)
            final = self.masked_forward(tokens, allowed)  # (1, m + P, C)
            out.append(vit.head(final[0, : allowed.shape[0]]))  # (m, d)
        return torch.cat(out)

    def describe(self) -> dict[str, object]:
        return {
            **super().describe(),
            "start_block": self.start_block,
            "threshold": self.threshold,
            "chunk_size": self.chunk_size,
            "resolution": self.resolution,
        }


__all__ = ["IPCLIP", "ipclip_attention_mask", "select_patches"]
