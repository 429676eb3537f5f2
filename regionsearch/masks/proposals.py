"""Automatic region proposals: classical, weight-free segmentation (the product default).

Why classical: indexing must work out of the box on a laptop CPU, with no model download.
The method is a small "selective search for masks":

1. shrink the photo (longest side ``work_size``) and over-segment it with Felzenszwalb's graph
   method at a few ``scales``;
2. build each segmentation's region adjacency graph and merge it greedily, most similar
   neighbours first (colour histogram, boundary weakness, size and fill terms, several
   weightings for diversity) — every intermediate union is a candidate, so one pass gives
   objects at every size; unions of adjacent segments are connected by construction;
3. score every candidate with a linear "objectness" of cheap cues — colour distinctiveness
   from its surroundings, stability across scales, compactness, not hugging the image border,
   outline contrast, a preferred size range — whose twelve weights were tuned on COCO
   train2017 (``benchmarks/proposals_recall.py --fit-score``; the ``objectness`` parameter picks
   a fit, see :data:`OBJECTNESS_FITS`); all statistics come from the segment graph, so scoring
   ~1000 candidates costs a few matrix products;
4. drop candidates below ``min_area`` (fraction of the image) or above 95 % of it, keep the
   best-scoring ones that overlap no kept region by more than ``iou_dedupe`` (greedy NMS on a
   ~96-pixel grid), stop at ``max_regions`` and always put the whole image first as one region
   (source ``"full-image"``, counted in ``max_regions``);
5. upsample the kept masks to the photo's size (nearest neighbour on the label maps).

Where the classical method fails (small objects; see the README's recall table), learned
generators do better: :mod:`regionsearch.masks.sam` wraps Segment Anything and SAM 2.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image
from skimage.color import rgb2lab
from skimage.segmentation import felzenszwalb

from regionsearch.masks.objectness_fits import COCO_FIT as _COCO_FIT
from regionsearch.masks.objectness_fits import DEFAULT_OBJECTNESS, OBJECTNESS_FITS
from regionsearch.masks.objectness_fits import SCORE_FEATURES as _SCORE_FEATURES
from regionsearch.masks.segment_graph import (
    Candidates,
    SegmentGraph,
    add_cross_scale_stability,
    build_graph,
    candidates,
    shared_pixels,
)
from regionsearch.masks.sources import ImageProposer, RegionProposal, as_rgb

__all__ = ["DEFAULT_OBJECTNESS", "OBJECTNESS_FITS", "AutomaticProposals"]


class AutomaticProposals(ImageProposer):
    """Weight-free, deterministic region proposals for any photo (a :class:`MaskSource`).

    Parameters:
        max_regions: regions returned per image, the whole-image region included.
        min_area: smallest region kept, as a fraction of the image area.
        iou_dedupe: a candidate overlapping an already kept region above this IoU is dropped.
        scales: Felzenszwalb ``scale`` values (larger = coarser initial segments).
        work_size: longest image side used for segmentation; masks are upsampled afterwards.
        sigma: Gaussian pre-smoothing of the Felzenszwalb step.
        objectness: which fitted ranking weights score candidates (:data:`OBJECTNESS_FITS`).
    """

    def __init__(
        self,
        max_regions: int = 50,
        min_area: float = 0.002,
        iou_dedupe: float = 0.5,
        scales: Sequence[float] = (100.0, 300.0),
        work_size: int = 384,
        sigma: float = 0.8,
        objectness: str | None = None,
    ) -> None:
        if max_regions < 1:
            raise ValueError(f"max_regions must be >= 1 (the whole image), got {max_regions}")
        if not 0.0 <= min_area < 1.0:
            raise ValueError(f"min_area is a fraction of the image, in [0, 1), got {min_area}")
        if not 0.0 < iou_dedupe <= 1.0:
            raise ValueError(f"iou_dedupe must be in (0, 1], got {iou_dedupe}")
        if len(scales) == 0 or any(s <= 0 for s in scales):
            raise ValueError(f"scales must be a non-empty list of positive numbers, got {scales}")
        if work_size < 32:
            raise ValueError(f"work_size must be >= 32 pixels, got {work_size}")
        objectness = DEFAULT_OBJECTNESS if objectness is None else objectness
        if objectness not in OBJECTNESS_FITS:
            raise ValueError(
                f"unknown objectness fit {objectness!r}; choose one of {sorted(OBJECTNESS_FITS)}"
            )
        self.max_regions = int(max_regions)
        self.min_area = float(min_area)
        self.iou_dedupe = float(iou_dedupe)
        self.scales = tuple(float(s) for s in scales)
        self.work_size = int(work_size)
        self.sigma = float(sigma)
        self.objectness = objectness

    def __repr__(self) -> str:
        return (
            f"AutomaticProposals(max_regions={self.max_regions}, min_area={self.min_area}, "
            f"iou_dedupe={self.iou_dedupe}, scales={self.scales}, work_size={self.work_size}, "
            f"sigma={self.sigma}, objectness={self.objectness!r})"
        )

    def propose(self, image: np.ndarray) -> list[RegionProposal]:
        """Proposals for an (H, W[, C]) image: the whole image first, then by falling score."""
        rgb = as_rgb(image)
        height, width = rgb.shape[:2]
        small = _shrink(rgb, self.work_size)
        pixels = small.shape[0] * small.shape[1]
        graphs, pools = self._pools(small)
        kept = self._select(graphs, pools, pixels)
        out = [RegionProposal(np.ones((height, width), bool), source="full-image", score=1.0)]
        full_labels: dict[int, np.ndarray] = {}
        for g, row, score in kept:
            if g not in full_labels:
                full_labels[g] = _upsample_labels(graphs[g].labels, height, width)
            mask = pools[g].member[row][full_labels[g]]
            out.append(RegionProposal(mask, source="proposal", score=float(score)))
        return out

    def _pools(self, small: np.ndarray) -> tuple[list[SegmentGraph], list[Candidates]]:
        """Candidates of every scale, scored (kept separate per scale: their label maps differ)."""
        lab = rgb2lab(small).astype(np.float32)
        pixels = small.shape[0] * small.shape[1]
        graphs: list[SegmentGraph] = []
        pools: list[Candidates] = []
        for scale in self.scales:
            labels = felzenszwalb(
                small, scale=scale, sigma=self.sigma, min_size=max(8, int(scale * pixels / 2e5))
            )
            graph = build_graph(labels.astype(np.int32), lab)
            graphs.append(graph)
            pools.append(candidates(graph, pixels))
        add_cross_scale_stability(graphs, pools)
        for pool in pools:
            pool.score = _score(pool.feats, pixels, OBJECTNESS_FITS[self.objectness])
        return graphs, pools

    def _select(
        self, graphs: list[SegmentGraph], pools: list[Candidates], pixels: int
    ) -> list[tuple[int, int, float]]:
        """Greedy NMS over all candidates; returns (segmentation, row, score) best first.

        IoU is exact at the working resolution yet never touches pixels: a candidate is a union
        of segments, so its intersection with a kept region is a dot product with that region's
        per-segment overlap counts (precomputed once per kept region and segmentation).
        """
        budget = self.max_regions - 1
        if budget == 0:
            return []
        pool_of = np.concatenate([np.full(len(p.score), g) for g, p in enumerate(pools)])
        row_of = np.concatenate([np.arange(len(p.score)) for p in pools])
        score = np.concatenate([p.score for p in pools])
        area = np.concatenate([p.area for p in pools])
        ok = (area >= max(1.0, self.min_area * pixels)) & (area <= 0.95 * pixels)
        # Deterministic order: score desc, then segmentation index, then row.
        order = np.lexsort((row_of, pool_of, -score))
        order = order[ok[order]]
        # shared[g][h]: (n_g, n_h) pixel counts shared by segment i of g and segment j of h.
        shared = [
            [shared_pixels(graphs[g], graphs[h]) for h in range(len(graphs))]
            for g in range(len(graphs))
        ]
        member = [p.member.astype(np.float32) for p in pools]
        # kept_overlap[g][:, k]: pixels of kept region k inside each segment of segmentation g.
        kept_overlap = [np.zeros((len(gr.area), budget), np.float32) for gr in graphs]
        kept_area = np.zeros(budget, np.float32)
        kept: list[tuple[int, int, float]] = []
        for idx in order:
            g, r = int(pool_of[idx]), int(row_of[idx])
            n = len(kept)
            if n:
                inter = member[g][r] @ kept_overlap[g][:, :n]
                iou = inter / (kept_area[:n] + area[idx] - inter)
                if iou.max() > self.iou_dedupe:
                    continue
            for h in range(len(graphs)):
                kept_overlap[h][:, n] = shared[h][g] @ member[g][r]
            kept_area[n] = area[idx]
            kept.append((g, r, float(score[idx])))
            if len(kept) == budget:
                break
        return kept


def _shrink(rgb: np.ndarray, work_size: int) -> np.ndarray:
    height, width = rgb.shape[:2]
    factor = work_size / max(height, width)
    if factor >= 1.0:
        return rgb
    size = (max(1, round(width * factor)), max(1, round(height * factor)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR))


def _upsample_labels(labels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour resize of a label map (pixel centres mapped back to the small grid)."""
    h, w = labels.shape
    rows = np.minimum(((np.arange(height) + 0.5) * h / height).astype(np.intp), h - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * w / width).astype(np.intp), w - 1)
    return labels[rows[:, None], cols[None, :]]


def _score_features(f: dict[str, np.ndarray], pixels: int) -> np.ndarray:
    """(r, len(_SCORE_FEATURES)) objectness features of candidates (exposed for tuning)."""
    outer = f["outer_diff"] / np.maximum(f["outer_len"], 1.0)
    inner = f["inner_diff"] / np.maximum(f["inner_len"], 1.0)
    perimeter = np.maximum(f["outer_len"] + f["border"], 1.0)
    log_area = np.log(np.maximum(f["area"], 1.0) / pixels)
    columns = {
        "log_area": log_area,
        "log_area_sq": log_area**2,
        "outer_contrast": outer,
        "inner_contrast": inner,
        "has_inner": (f["inner_len"] > 0).astype(np.float64),
        "compactness": 4.0 * np.pi * f["area"] / perimeter**2,
        "fill": f["area"] / np.maximum(f["box_area"], 1.0),
        "border_fraction": f["border"] / perimeter,
        "log_segments": np.log(f["segments"]),
        "support": f["support"],
        "stability": f["stability"],
        "distinct": f["distinct"],
    }
    return np.stack([columns[name] for name in _SCORE_FEATURES], axis=1)


def _score(
    f: dict[str, np.ndarray], pixels: int, fit: tuple[float, np.ndarray] = _COCO_FIT
) -> np.ndarray:
    """Objectness in [0, 1]: estimated chance that the candidate matches an object (IoU >= 0.5).

    A logistic score of shape, contrast and stability cues; ``fit`` is (bias, weights).
    """
    bias, weights = fit
    logit = _score_features(f, pixels) @ weights + bias
    return 1.0 / (1.0 + np.exp(-np.clip(logit, -30.0, 30.0)))
