"""MaskInversion (Bousselham et al., 2024): a region's embedding is the vector whose LeGrad
explainability map matches the region's mask.

For each mask a localized embedding token (LET) is initialised with the image's CLIP embedding
and optimised for a few AdamW steps so that the explainability map of ``normalize(LET)`` on the
frozen model's last block matches the mask under a soft Dice loss (method.md §1).

Two implementations, one result:

* ``naive`` — the method as published: the image is repeated once per mask, the last block's
  graph is kept, and every step differentiates the map (itself a gradient) with a double
  backward. Cost and memory grow with M copies of the image.
* ``decomposed`` — one forward pass per image; the map is linear in the LET up to the ReLU, so
  the image-only factors are cached (:class:`~regionsearch.embedders.legrad.BlockFactors`) and
  each step is a few matrix products per mask, processed in chunks to bound memory.

``auto`` (the default) picks ``naive`` for a handful of masks and ``decomposed`` from
``auto_threshold`` masks on, the break-even measured by ``benchmarks/embedders_speed.py``.

What is computed is the authors' ``maskinversion-torch`` 1.1 (checked against their package by
``tests/test_authors_parity.py``, fixture from ``scripts/make_parity_fixture.py``): float32,
positional embeddings resampled as timm does, the map upsampled to the input size, min-max
normalised, bilinearly resized to the mask's own resolution and compared there by soft Dice.
One deliberate difference: the loss is *summed* over the masks of a call where the authors
average it. Each mask's token then gets exactly the gradient of its own loss, and AdamW acts per
coordinate, so a mask's embedding does not depend on which or how many other masks share the
call (with the authors' mean, AdamW's ``eps`` couples it to the mask count). With one mask per
call the two are identical.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from regionsearch.backbone import Backbone, ViTRunner
from regionsearch.embedders.base import RegionEmbedder, check_positive, check_resolution
from regionsearch.embedders.legrad import (
    BlockFactors,
    mean_token_score_features,
    relevance_decomposed,
    relevance_from_attention_grad,
    relevance_to_maps,
)

Method = Literal["auto", "naive", "decomposed"]


@dataclass
class InversionResult:
    """Everything one MaskInversion run produced, for inspection and tests."""

    embeddings: torch.Tensor  # (M, d) final LETs, L2-normalised
    #: (M, H, W) maps at the masks' resolution of the LETs the last loss was computed on (the
    #: authors return these: the map before the last update), None unless asked for.
    maps: torch.Tensor | None
    losses: list[float]  # mean loss over masks per step (the authors' loss for one mask)
    mask_losses: torch.Tensor  # (steps, M) each mask's loss per step
    method: str


def soft_dice_loss(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per-mask soft Dice loss ``1 - (2 sum(E m) + 1) / (sum E + sum m + 1)``; ``(M,)``."""
    inter = (maps * masks).flatten(1).sum(dim=1)
    total = maps.flatten(1).sum(dim=1) + masks.flatten(1).sum(dim=1)
    return 1 - (2 * inter + 1) / (total + 1)


class MaskInversion(RegionEmbedder):
    """Localized CLIP embeddings by inverting LeGrad explainability maps.

    Args:
        backbone: the frozen CLIP model (run in float32 at least, as the authors force).
        steps: AdamW iterations (authors: 10).
        lr: learning rate on the raw LET. The authors' class default is 0.1, their examples use
            0.5; 0.5 here (README: it wins text-to-region retrieval and expressions).
        resolution: square input size; default :attr:`Backbone.region_resolution` — twice the
            model's native size (448 px for a 224 px ViT-B/16, as in the paper) unless the
            model's config pins another; positional embeddings resampled as timm does.
        alpha: weight of ``1 - cos(LET, image embedding)``, which keeps global context
            (authors' default 0; the paper uses 5 for referring expressions).
        method: ``"auto"``, ``"naive"`` or ``"decomposed"``.
        chunk_size: masks per chunk in the decomposed path (bounds peak memory).
        auto_threshold: with ``method="auto"``, use the decomposed path from this many masks.
    """

    name = "maskinversion"

    def __init__(
        self,
        backbone: Backbone,
        steps: int = 10,
        lr: float = 0.5,
        resolution: int | None = None,
        alpha: float = 0.0,
        method: Method = "auto",
        chunk_size: int = 16,
        auto_threshold: int = 1,
    ) -> None:
        super().__init__(backbone)
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        if method not in ("auto", "naive", "decomposed"):
            raise ValueError(f"method must be auto, naive or decomposed, got {method!r}")
        self.steps = steps
        self.lr = lr
        self.resolution = check_resolution(backbone, resolution or backbone.region_resolution)
        self.alpha = alpha
        self.method: Method = method
        self.chunk_size = check_positive("chunk_size", chunk_size)
        self.auto_threshold = auto_threshold

    def describe(self) -> dict[str, object]:
        return {
            **super().describe(),
            "steps": self.steps,
            "lr": self.lr,
            "resolution": self.resolution,
            "alpha": self.alpha,
        }

    def choose_method(self, num_masks: int) -> str:
        """The implementation ``auto`` resolves to for ``num_masks`` masks."""
        if self.method != "auto":
            return self.method
        return "decomposed" if num_masks >= self.auto_threshold else "naive"

    def _embed(self, image: np.ndarray, masks: torch.Tensor) -> torch.Tensor:
        return self.invert(image, masks, return_maps=False).embeddings

    @property
    def _runner(self) -> ViTRunner:
        return self.backbone.vit_float32

    def invert(
        self,
        image: np.ndarray,
        masks: torch.Tensor,
        method: str | None = None,
        return_maps: bool = True,
    ) -> InversionResult:
        """Run MaskInversion on validated input (see :meth:`embed` for the public entry).

        ``masks`` ``(M, H, W)`` stay at their own resolution: the Dice loss is computed there.
        """
        method = method or self.choose_method(masks.shape[0])
        dtype = self._runner.visual.conv1.weight.dtype
        pixels = self.backbone.preprocess(image, self.resolution)[None].to(dtype)
        target = masks.to(self.device, dtype)
        if method == "naive":
            return self._invert_naive(pixels, target, return_maps)
        if method == "decomposed":
            return self._invert_decomposed(pixels, target, return_maps)
        raise ValueError(f"unknown method {method!r}")

    # ------------------------------------------------------------------ shared pieces
    @property
    def _grid(self) -> tuple[int, int]:
        return self._runner.grid_for(self.resolution, self.resolution)

    def _loss(
        self,
        relevance: torch.Tensor,
        masks: torch.Tensor,
        queries: torch.Tensor,
        image_direction: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-mask Dice at the masks' resolution (+ alpha * context term), and the maps it
        was computed on. Callers minimise the sum over masks (see the module docstring)."""
        size = (self.resolution, self.resolution)
        maps = relevance_to_maps(relevance, self._grid, size, masks.shape[-2:])
        loss = soft_dice_loss(maps, masks)
        if self.alpha:
            loss = loss + self.alpha * (1 - (image_direction * queries).sum(dim=-1))
        return loss, maps

    def _optimizer(
        self, init: torch.Tensor, count: int
    ) -> tuple[torch.Tensor, torch.optim.Optimizer]:
        let = init.detach().expand(count, -1).clone().requires_grad_(True)
        return let, torch.optim.AdamW([let], lr=self.lr, weight_decay=0.0)

    # ------------------------------------------------------------------ naive
    def _invert_naive(
        self, pixels: torch.Tensor, masks: torch.Tensor, return_maps: bool
    ) -> InversionResult:
        runner = self._runner
        count = masks.shape[0]
        last = len(runner.blocks) - 1
        with torch.no_grad():
            tokens = runner.run_blocks(runner.embed(pixels.expand(count, -1, -1, -1)), 0, last)
        with torch.enable_grad():
            outputs, probs = runner.block(last, tokens, return_probs=True)
            features = mean_token_score_features(runner, outputs)
        image_embedding = runner.head(outputs[:1, 0]).detach()
        image_direction = F.normalize(image_embedding, dim=-1)
        let, optimizer = self._optimizer(image_embedding, count)
        losses: list[torch.Tensor] = []
        maps: torch.Tensor | None = None

        def relevance_of(queries: torch.Tensor, create_graph: bool) -> torch.Tensor:
            score = (features * queries).sum()
            (grad,) = torch.autograd.grad(
                score, probs, create_graph=create_graph, retain_graph=True
            )
            return relevance_from_attention_grad(grad)

        with torch.enable_grad():
            for _ in range(self.steps):
                queries = F.normalize(let, dim=-1)
                loss, maps = self._loss(
                    relevance_of(queries, True), masks, queries, image_direction
                )
                optimizer.zero_grad(set_to_none=True)
                loss.sum().backward(retain_graph=True)
                optimizer.step()
                losses.append(loss.detach())
            if return_maps and maps is None:  # no steps: the map of the initial token
                queries = F.normalize(let.detach(), dim=-1)
                _, maps = self._loss(relevance_of(queries, False), masks, queries, image_direction)
        final = F.normalize(let.detach(), dim=-1)
        return _result(final, _kept(maps, return_maps), losses, count, "naive")

    # ------------------------------------------------------------------ decomposed
    def _invert_decomposed(
        self, pixels: torch.Tensor, masks: torch.Tensor, return_maps: bool
    ) -> InversionResult:
        runner = self._runner
        count = masks.shape[0]
        last = len(runner.blocks) - 1
        with torch.no_grad():
            tokens = runner.run_blocks(runner.embed(pixels), 0, last)
            outputs, _ = runner.block(last, tokens)
            image_embedding = runner.head(outputs[:, 0])
        image_direction = F.normalize(image_embedding, dim=-1)
        factors = BlockFactors.compute(runner, last, tokens)
        let, optimizer = self._optimizer(image_embedding, count)
        losses: list[torch.Tensor] = []
        chunks = [
            slice(start, min(start + self.chunk_size, count))
            for start in range(0, count, self.chunk_size)
        ]
        kept: list[torch.Tensor] = []
        with torch.enable_grad():
            for step in range(self.steps):
                optimizer.zero_grad(set_to_none=True)
                step_losses = []
                for chunk in chunks:
                    queries = F.normalize(let[chunk], dim=-1)
                    relevance = relevance_decomposed(
                        factors, queries, self.chunk_size, checkpoint_chunks=False
                    )
                    loss, maps = self._loss(relevance, masks[chunk], queries, image_direction)
                    loss.sum().backward()
                    step_losses.append(loss.detach())
                    if return_maps and step == self.steps - 1:
                        kept.append(maps.detach())
                optimizer.step()
                losses.append(torch.cat(step_losses))
        if return_maps and not kept:  # no steps: the maps of the initial tokens
            with torch.no_grad():
                for chunk in chunks:
                    queries = F.normalize(let.detach()[chunk], dim=-1)
                    relevance = relevance_decomposed(factors, queries, self.chunk_size)
                    kept.append(self._loss(relevance, masks[chunk], queries, image_direction)[1])
        final = F.normalize(let.detach(), dim=-1)
        maps = torch.cat(kept) if kept else None
        return _result(final, maps, losses, count, "decomposed")


def _kept(maps: torch.Tensor | None, wanted: bool) -> torch.Tensor | None:
    return maps.detach() if wanted and maps is not None else None


def _result(
    embeddings: torch.Tensor,
    maps: torch.Tensor | None,
    losses: list[torch.Tensor],
    count: int,
    method: str,
) -> InversionResult:
    """Pack a run: per-step means for display, per-mask losses as computed."""
    per_mask = torch.stack(losses).cpu() if losses else torch.zeros(0, count)
    means = [float(row.sum()) / count for row in per_mask]
    return InversionResult(embeddings, maps, means, per_mask, method)
