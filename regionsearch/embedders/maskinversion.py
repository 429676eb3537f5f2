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

from dataclasses import dataclass, replace
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
    mask_losses: torch.Tensor  # (steps, M) each mask's loss per step
    method: str

    @property
    def losses(self) -> list[float]:
        """Mean loss over masks per step (the authors' loss for one mask)."""
        return self.mask_losses.mean(dim=1).tolist()


def bilinear_matrix(
    out_size: int, in_size: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """The ``(out, in)`` matrix of a 1-D bilinear resize (``align_corners=False``), read off
    ``F.interpolate`` itself so that its weights are PyTorch's."""
    eye = torch.eye(in_size, dtype=dtype, device=device)[None]  # in one-hot channels
    return F.interpolate(eye, size=out_size, mode="linear", align_corners=False)[0].T


@dataclass
class MaskDice:
    """Soft Dice of the authors' map against masks at the masks' own resolution, without
    building the map at that resolution on every step.

    The authors' map is ``E = V_r x V_c^T`` with ``x = (y - min y) / (max y - min y)`` and
    ``y = U_r R U_c^T`` (``R``: relevance on the patch grid; ``U``: bilinear to the input size;
    ``V``: bilinear to the mask's size). Both Dice sums are linear in ``x`` —
    ``sum(E m) = <x, V_r^T m V_c>`` and ``sum(E) = <x, V_r^T 1 V_c>`` — and their inner products
    with ``y`` pull back to the patch grid. So each mask is projected onto the grid once, and a
    step costs grid-sized products plus the min and max of ``y`` (found without gradient; the
    gradient flows through the two chosen pixels, as through the authors' ``max``). Same number
    as resizing the map, without the per-step resizes and their slow backward passes.
    """

    rows: torch.Tensor  # (S_h, g_h): bilinear grid -> input rows
    cols: torch.Tensor  # (S_w, g_w)
    mask_grid: torch.Tensor  # (M, g_h, g_w): U_r^T V_r^T m V_c U_c
    ones_grid: torch.Tensor  # (g_h, g_w): the same for an all-ones mask
    mask_input_sum: torch.Tensor  # (M,): sum(V_r^T m V_c)
    ones_input_sum: torch.Tensor  # (): sum(V_r^T 1 V_c)
    mask_sum: torch.Tensor  # (M,): sum(m)

    @classmethod
    def build(
        cls, masks: torch.Tensor, grid: tuple[int, int], input_size: tuple[int, int]
    ) -> MaskDice:
        """Project ``(M, H, W)`` masks onto the patch ``grid`` of an ``input_size`` input."""
        dtype, device = masks.dtype, masks.device
        rows = bilinear_matrix(input_size[0], grid[0], dtype, device)
        cols = bilinear_matrix(input_size[1], grid[1], dtype, device)
        down_rows = bilinear_matrix(masks.shape[-2], input_size[0], dtype, device)  # (H, S_h)
        down_cols = bilinear_matrix(masks.shape[-1], input_size[1], dtype, device)  # (W, S_w)
        to_grid_rows = down_rows @ rows  # (H, g_h)
        to_grid_cols = down_cols @ cols  # (W, g_w)
        row_weight = down_rows.sum(dim=1)  # (H,): V_r 1 (ones up to round-off)
        col_weight = down_cols.sum(dim=1)
        return cls(
            rows=rows,
            cols=cols,
            mask_grid=to_grid_rows.T @ masks @ to_grid_cols,
            ones_grid=torch.outer(to_grid_rows.sum(dim=0), to_grid_cols.sum(dim=0)),
            mask_input_sum=(row_weight[:, None] * masks * col_weight).sum(dim=(1, 2)),
            ones_input_sum=row_weight.sum() * col_weight.sum(),
            mask_sum=masks.sum(dim=(1, 2)),
        )

    def select(self, masks: slice) -> MaskDice:
        """The same for a slice of the masks (a chunk)."""
        return replace(
            self,
            mask_grid=self.mask_grid[masks],
            mask_input_sum=self.mask_input_sum[masks],
            mask_sum=self.mask_sum[masks],
        )

    def loss(self, relevance: torch.Tensor) -> torch.Tensor:
        """``(M, n-1)`` relevance → ``(M,)`` soft Dice losses."""
        grid = relevance.reshape(-1, self.rows.shape[1], self.cols.shape[1])
        width = self.cols.shape[0]
        with torch.no_grad():
            upsampled = (self.rows @ grid @ self.cols.T).flatten(1)
            brightest, darkest = upsampled.argmax(dim=1), upsampled.argmin(dim=1)
        high = self._value_at(grid, brightest, width)
        low = self._value_at(grid, darkest, width)
        scale = (high - low).clamp_min(1e-12)
        inter = ((grid * self.mask_grid).sum(dim=(1, 2)) - low * self.mask_input_sum) / scale
        total = ((grid * self.ones_grid).sum(dim=(1, 2)) - low * self.ones_input_sum) / scale
        return 1 - (2 * inter + 1) / (total + self.mask_sum + 1)

    def _value_at(self, grid: torch.Tensor, index: torch.Tensor, width: int) -> torch.Tensor:
        """``y`` at flat pixel ``index`` per mask, differentiable in ``grid``."""
        rows = self.rows[index // width]  # (M, g_h)
        cols = self.cols[index % width]  # (M, g_w)
        return torch.einsum("mg,mgh,mh->m", rows, grid, cols)


class MaskInversion(RegionEmbedder):
    """Localized CLIP embeddings by inverting LeGrad explainability maps.

    Args:
        backbone: the frozen CLIP model (run in float32 at least, as the authors force).
        steps: AdamW iterations (authors: 10).
        lr: learning rate on the raw LET. The authors' class default is 0.1, their examples use
            0.5; 0.2 here: with the default ``reference-v8`` it beats 0.5 on search over
            proposals, classes, retrieval and grounding on held-out scenes, losing a little on
            expressions (README, *Defaults*).
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
        lr: float = 0.2,
        resolution: int | None = None,
        alpha: float = 0.0,
        method: Method = "auto",
        chunk_size: int = 16,
        auto_threshold: int = 1,
    ) -> None:
        super().__init__(backbone)
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        if not lr > 0:  # also refuses NaN
            raise ValueError(f"lr must be > 0, got {lr}")
        if not alpha >= 0:
            raise ValueError(f"alpha must be >= 0 (the weight of the regulariser), got {alpha}")
        if method not in ("auto", "naive", "decomposed"):
            raise ValueError(f"method must be auto, naive or decomposed, got {method!r}")
        self.steps = steps
        self.lr = lr
        self.resolution = check_resolution(backbone, resolution or backbone.region_resolution)
        self.alpha = alpha
        self.method: Method = method
        self.chunk_size = check_positive("chunk_size", chunk_size)
        self.auto_threshold = check_positive("auto_threshold", auto_threshold)

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

    def _dice(self, masks: torch.Tensor) -> MaskDice:
        return MaskDice.build(masks, self._grid, (self.resolution, self.resolution))

    def _loss(
        self,
        relevance: torch.Tensor,
        dice: MaskDice,
        queries: torch.Tensor,
        image_direction: torch.Tensor,
    ) -> torch.Tensor:
        """Per-mask loss: Dice at the masks' resolution (+ alpha * context term). Callers
        minimise the sum over masks (see the module docstring)."""
        loss = dice.loss(relevance)
        if self.alpha:
            loss = loss + self.alpha * (1 - (image_direction * queries).sum(dim=-1))
        return loss

    def _maps(self, relevance: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """The authors' maps at the masks' resolution (only built when asked for)."""
        size = (self.resolution, self.resolution)
        return relevance_to_maps(relevance.detach(), self._grid, size, masks.shape[-2:])

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
        dice = self._dice(masks)
        let, optimizer = self._optimizer(image_embedding, count)
        losses: list[torch.Tensor] = []

        def relevance_of(queries: torch.Tensor, create_graph: bool) -> torch.Tensor:
            score = (features * queries).sum()
            (grad,) = torch.autograd.grad(
                score, probs, create_graph=create_graph, retain_graph=True
            )
            return relevance_from_attention_grad(grad)

        with torch.enable_grad():
            relevance = None
            for _ in range(self.steps):
                queries = F.normalize(let, dim=-1)
                relevance = relevance_of(queries, True)
                loss = self._loss(relevance, dice, queries, image_direction)
                optimizer.zero_grad(set_to_none=True)
                loss.sum().backward(retain_graph=True)
                optimizer.step()
                losses.append(loss.detach())
            if return_maps and relevance is None:  # no steps: the map of the initial token
                relevance = relevance_of(F.normalize(let.detach(), dim=-1), False)
        maps = self._maps(relevance, masks) if return_maps else None
        final = F.normalize(let.detach(), dim=-1)
        return _result(final, maps, losses, count, "naive")

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
        dice = self._dice(masks)
        let, optimizer = self._optimizer(image_embedding, count)
        losses: list[torch.Tensor] = []
        chunks = [
            slice(start, min(start + self.chunk_size, count))
            for start in range(0, count, self.chunk_size)
        ]
        chunk_dice = [dice.select(chunk) for chunk in chunks]
        # one gradient tensor for every chunk and step: each chunk is backpropagated at once
        workspace = factors.gradient_workspace(min(self.chunk_size, count))
        last_relevance: list[torch.Tensor] = []
        with torch.enable_grad():
            for step in range(self.steps):
                optimizer.zero_grad(set_to_none=True)
                step_losses = []
                for chunk, chunk_masks in zip(chunks, chunk_dice, strict=True):
                    queries = F.normalize(let[chunk], dim=-1)
                    relevance = relevance_decomposed(
                        factors,
                        queries,
                        self.chunk_size,
                        checkpoint_chunks=False,
                        workspace=workspace,
                    )
                    loss = self._loss(relevance, chunk_masks, queries, image_direction)
                    loss.sum().backward()
                    step_losses.append(loss.detach())
                    if return_maps and step == self.steps - 1:
                        last_relevance.append(relevance.detach())
                optimizer.step()
                losses.append(torch.cat(step_losses))
        maps = None
        if return_maps:
            if not last_relevance:  # no steps: the maps of the initial tokens
                with torch.no_grad():
                    queries = F.normalize(let.detach(), dim=-1)
                    last_relevance = [relevance_decomposed(factors, queries, self.chunk_size)]
            maps = self._maps(torch.cat(last_relevance), masks)
        final = F.normalize(let.detach(), dim=-1)
        return _result(final, maps, losses, count, "decomposed")


def _result(
    embeddings: torch.Tensor,
    maps: torch.Tensor | None,
    losses: list[torch.Tensor],
    count: int,
    method: str,
) -> InversionResult:
    """Pack a run: the per-mask losses of every step, as computed."""
    per_mask = torch.stack(losses).cpu() if losses else torch.zeros(0, count)
    return InversionResult(embeddings, maps, per_mask, method)
