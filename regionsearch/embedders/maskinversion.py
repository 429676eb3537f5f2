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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from regionsearch.backbone import Backbone, resize_masks
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
    maps: torch.Tensor  # (M, S, S) explainability maps of the final LETs
    losses: list[float]  # mean loss per step
    method: str


def soft_dice_loss(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per-mask soft Dice loss ``1 - (2 sum(E m) + 1) / (sum E + sum m + 1)``; ``(M,)``."""
    inter = (maps * masks).flatten(1).sum(dim=1)
    total = maps.flatten(1).sum(dim=1) + masks.flatten(1).sum(dim=1)
    return 1 - (2 * inter + 1) / (total + 1)


class MaskInversion(RegionEmbedder):
    """Localized CLIP embeddings by inverting LeGrad explainability maps.

    Args:
        backbone: the frozen CLIP model.
        steps: AdamW iterations (paper: 10).
        lr: learning rate on the raw LET (authors' examples: 0.5).
        resolution: square input size; default :attr:`Backbone.region_resolution` — twice the
            model's native size (448 px for a 224 px ViT-B/16, as in the paper) unless the
            model's config pins another; positional embeddings interpolated.
        alpha: weight of ``1 - cos(LET, image embedding)``, which keeps global context
            (0 by default; the paper uses 5 for referring expressions).
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
        return self.invert(image, masks).embeddings

    def invert(
        self, image: np.ndarray, masks: torch.Tensor, method: str | None = None
    ) -> InversionResult:
        """Run MaskInversion on validated input (see :meth:`embed` for the public entry)."""
        method = method or self.choose_method(masks.shape[0])
        dtype = self.backbone.model.visual.conv1.weight.dtype
        pixels = self.backbone.preprocess(image, self.resolution)[None].to(dtype)
        target = resize_masks(masks.to(self.device, dtype), self.resolution)
        if method == "naive":
            return self._invert_naive(pixels, target)
        if method == "decomposed":
            return self._invert_decomposed(pixels, target)
        raise ValueError(f"unknown method {method!r}")

    # ------------------------------------------------------------------ shared pieces
    @property
    def _grid(self) -> tuple[int, int]:
        return self.backbone.vit.grid_for(self.resolution, self.resolution)

    def _loss(
        self,
        relevance: torch.Tensor,
        masks: torch.Tensor,
        queries: torch.Tensor,
        image_embedding: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Sum over masks of Dice (+ alpha * context term), and the maps it was computed on."""
        maps = relevance_to_maps(relevance, self._grid, masks.shape[-2:])
        loss = soft_dice_loss(maps, masks)
        if self.alpha:
            loss = loss + self.alpha * (1 - F.cosine_similarity(queries, image_embedding, dim=-1))
        return loss.sum(), maps

    def _optimizer(
        self, init: torch.Tensor, count: int
    ) -> tuple[torch.Tensor, torch.optim.Optimizer]:
        let = init.detach().expand(count, -1).clone().requires_grad_(True)
        return let, torch.optim.AdamW([let], lr=self.lr, weight_decay=0.0)

    # ------------------------------------------------------------------ naive
    def _invert_naive(self, pixels: torch.Tensor, masks: torch.Tensor) -> InversionResult:
        runner = self.backbone.vit
        count = masks.shape[0]
        last = len(runner.blocks) - 1
        with torch.no_grad():
            tokens = runner.run_blocks(runner.embed(pixels.expand(count, -1, -1, -1)), 0, last)
        with torch.enable_grad():
            outputs, probs = runner.block(last, tokens, return_probs=True)
            features = mean_token_score_features(runner, outputs)
        image_embedding = runner.head(outputs[:1, 0]).detach()
        let, optimizer = self._optimizer(image_embedding, count)
        losses: list[float] = []

        def relevance_of(queries: torch.Tensor, create_graph: bool) -> torch.Tensor:
            score = (features * queries).sum()
            (grad,) = torch.autograd.grad(
                score, probs, create_graph=create_graph, retain_graph=True
            )
            return relevance_from_attention_grad(grad)

        with torch.enable_grad():
            for _ in range(self.steps):
                queries = F.normalize(let, dim=-1)
                loss, _ = self._loss(relevance_of(queries, True), masks, queries, image_embedding)
                optimizer.zero_grad(set_to_none=True)
                loss.backward(retain_graph=True)
                optimizer.step()
                losses.append(loss.item() / count)
            queries = F.normalize(let.detach(), dim=-1)
            relevance = relevance_of(queries, False)
        maps = relevance_to_maps(relevance, self._grid, masks.shape[-2:])
        return InversionResult(queries, maps.detach(), losses, "naive")

    # ------------------------------------------------------------------ decomposed
    def _invert_decomposed(self, pixels: torch.Tensor, masks: torch.Tensor) -> InversionResult:
        runner = self.backbone.vit
        count = masks.shape[0]
        last = len(runner.blocks) - 1
        with torch.no_grad():
            tokens = runner.run_blocks(runner.embed(pixels), 0, last)
            outputs, _ = runner.block(last, tokens)
            image_embedding = runner.head(outputs[:, 0])
        factors = BlockFactors.compute(runner, last, tokens)
        let, optimizer = self._optimizer(image_embedding, count)
        losses: list[float] = []
        chunks = [
            slice(start, min(start + self.chunk_size, count))
            for start in range(0, count, self.chunk_size)
        ]
        with torch.enable_grad():
            for _ in range(self.steps):
                optimizer.zero_grad(set_to_none=True)
                total = 0.0
                for chunk in chunks:
                    queries = F.normalize(let[chunk], dim=-1)
                    relevance = relevance_decomposed(
                        factors, queries, self.chunk_size, checkpoint_chunks=False
                    )
                    loss, _ = self._loss(relevance, masks[chunk], queries, image_embedding)
                    loss.backward()
                    total += loss.item()
                optimizer.step()
                losses.append(total / count)
        queries = F.normalize(let.detach(), dim=-1)
        with torch.no_grad():
            maps = torch.cat(
                [
                    relevance_to_maps(
                        relevance_decomposed(factors, queries[chunk], self.chunk_size),
                        self._grid,
                        masks.shape[-2:],
                    )
                    for chunk in chunks
                ]
            )
        return InversionResult(queries, maps, losses, "decomposed")
