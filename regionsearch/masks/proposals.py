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

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.color import rgb2lab
from skimage.segmentation import felzenszwalb

from regionsearch.masks.objectness_fits import COCO_FIT as _COCO_FIT
from regionsearch.masks.objectness_fits import DEFAULT_OBJECTNESS, OBJECTNESS_FITS
from regionsearch.masks.objectness_fits import SCORE_FEATURES as _SCORE_FEATURES
from regionsearch.masks.sources import ImageProposer, RegionProposal, as_rgb

__all__ = ["DEFAULT_OBJECTNESS", "OBJECTNESS_FITS", "AutomaticProposals"]

_HIST_BINS = 16  # per Lab channel; colour similarity = histogram intersection


@dataclass(frozen=True)
class _Strategy:
    """Weights of one merge order; different orders give different (complementary) unions."""

    colour: float
    edge: float
    size: float
    fill: float


# Colour+size is the classic selective-search order; edge-driven merging follows image
# boundaries (closest to an ultrametric contour map); fill favours compact unions.
_STRATEGIES: tuple[_Strategy, ...] = (
    _Strategy(colour=1.0, edge=1.0, size=1.0, fill=1.0),
    _Strategy(colour=0.0, edge=1.0, size=1.0, fill=0.0),
    _Strategy(colour=1.0, edge=0.0, size=1.0, fill=1.0),
)


@dataclass
class _Graph:
    """Region adjacency graph of one over-segmentation, with per-segment statistics."""

    labels: np.ndarray  # (h, w) int32, values 0..n-1
    area: np.ndarray  # (n,) pixel counts
    hist: np.ndarray  # (n, 3 * _HIST_BINS) L1-normalised colour histograms
    bbox: np.ndarray  # (n, 4) min_row, min_col, max_row + 1, max_col + 1
    border: np.ndarray  # (n,) pixels on the image border
    edges: dict[tuple[int, int], tuple[float, float]]  # (i<j) -> (boundary length, diff sum)
    edge_arrays: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # i, j, length, diff


@dataclass
class _Candidates:
    """Candidate regions of one segmentation as rows of a membership matrix over segments."""

    member: np.ndarray  # (r, n) bool
    feats: dict[str, np.ndarray]  # per-candidate statistics, see _features
    score: np.ndarray  # (r,) float, filled in once all scales are known

    @property
    def area(self) -> np.ndarray:
        return self.feats["area"]


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

    def _pools(self, small: np.ndarray) -> tuple[list[_Graph], list[_Candidates]]:
        """Candidates of every scale, scored (kept separate per scale: their label maps differ)."""
        lab = rgb2lab(small).astype(np.float32)
        pixels = small.shape[0] * small.shape[1]
        graphs: list[_Graph] = []
        pools: list[_Candidates] = []
        for scale in self.scales:
            labels = felzenszwalb(
                small, scale=scale, sigma=self.sigma, min_size=max(8, int(scale * pixels / 2e5))
            )
            graph = _build_graph(labels.astype(np.int32), lab)
            graphs.append(graph)
            pools.append(_candidates(graph, pixels))
        _add_cross_scale_stability(graphs, pools)
        for pool in pools:
            pool.score = _score(pool.feats, pixels, OBJECTNESS_FITS[self.objectness])
        return graphs, pools

    def _select(
        self, graphs: list[_Graph], pools: list[_Candidates], pixels: int
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
            [_shared_pixels(graphs[g], graphs[h]) for h in range(len(graphs))]
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


def _shared_pixels(a: _Graph, b: _Graph) -> np.ndarray:
    """(n_a, n_b) float32 table of pixels in segment i of ``a`` and segment j of ``b``."""
    if a is b:
        return np.diag(a.area).astype(np.float32)
    na, nb = len(a.area), len(b.area)
    counts = np.bincount(a.labels.ravel() * nb + b.labels.ravel(), minlength=na * nb)
    return counts.reshape(na, nb).astype(np.float32)


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


def _build_graph(labels: np.ndarray, lab: np.ndarray) -> _Graph:
    """Segment statistics and 4-neighbour adjacency with boundary length and colour contrast."""
    _, inverse = np.unique(labels, return_inverse=True)
    labels = inverse.reshape(labels.shape).astype(np.int32)
    n = int(labels.max()) + 1
    area = np.bincount(labels.ravel(), minlength=n).astype(np.float64)

    quant = np.clip(
        (
            (lab - np.array([0.0, -100.0, -100.0], np.float32))
            / np.array([100.0, 200.0, 200.0], np.float32)
            * _HIST_BINS
        ).astype(np.int64),
        0,
        _HIST_BINS - 1,
    )
    hist = np.concatenate(
        [
            np.bincount(
                labels.ravel() * _HIST_BINS + quant[..., c].ravel(), minlength=n * _HIST_BINS
            ).reshape(n, _HIST_BINS)
            for c in range(3)
        ],
        axis=1,
    ).astype(np.float64)
    hist /= hist.sum(axis=1, keepdims=True)

    bbox = np.zeros((n, 4), dtype=np.float64)
    for i, sl in enumerate(ndimage.find_objects(labels + 1)):
        if sl is not None:
            bbox[i] = (sl[0].start, sl[1].start, sl[0].stop, sl[1].stop)

    a_parts, b_parts, d_parts = [], [], []
    for axis in (0, 1):
        la = labels[:-1] if axis == 0 else labels[:, :-1]
        lb = labels[1:] if axis == 0 else labels[:, 1:]
        ca = lab[:-1] if axis == 0 else lab[:, :-1]
        cb = lab[1:] if axis == 0 else lab[:, 1:]
        diff = la != lb
        a_parts.append(la[diff])
        b_parts.append(lb[diff])
        d_parts.append(np.sqrt(((ca[diff] - cb[diff]) ** 2).sum(axis=-1)))
    a = np.concatenate(a_parts).astype(np.int64)
    b = np.concatenate(b_parts).astype(np.int64)
    d = np.concatenate(d_parts).astype(np.float64)
    key = np.minimum(a, b) * n + np.maximum(a, b)
    uniq, inv = np.unique(key, return_inverse=True)
    length = np.bincount(inv, minlength=len(uniq))
    dsum = np.bincount(inv, weights=d, minlength=len(uniq))
    edges = {
        (int(k // n), int(k % n)): (float(ln), float(ds))
        for k, ln, ds in zip(uniq, length, dsum, strict=True)
    }
    frame = np.zeros(labels.shape, dtype=bool)
    frame[[0, -1], :] = True
    frame[:, [0, -1]] = True
    border = np.bincount(labels[frame], minlength=n).astype(np.float64)
    edge_arrays = (uniq // n, uniq % n, length.astype(np.float64), dsum)
    return _Graph(
        labels=labels,
        area=area,
        hist=hist,
        bbox=bbox,
        border=border,
        edges=edges,
        edge_arrays=edge_arrays,
    )


def _candidates(graph: _Graph, pixels: int) -> _Candidates:
    """All segments plus every union created by each merge strategy, with their statistics."""
    n = len(graph.area)
    member = np.concatenate(
        [np.eye(n, dtype=bool)] + [_merge(graph, st, pixels) for st in _STRATEGIES], axis=0
    )
    # The same union often comes out of several strategies: keep each distinct one once and
    # remember how many strategies agreed on it (a cheap stability cue).
    _, first, counts = np.unique(
        np.packbits(member, axis=1), axis=0, return_index=True, return_counts=True
    )
    order = np.argsort(first)
    member = member[first[order]]
    feats = _features(graph, member)
    feats["support"] = counts[order].astype(np.float64)
    return _Candidates(member=member, feats=feats, score=np.zeros(len(member)))


def _features(graph: _Graph, member: np.ndarray) -> dict[str, np.ndarray]:
    """Per-candidate shape, boundary and colour statistics, computed from segment-level ones."""
    m = member.astype(np.float64)
    ei, ej, length, diff = graph.edge_arrays
    mi, mj = member[:, ei], member[:, ej]
    cut = (mi ^ mj).astype(np.float64)
    inside = (mi & mj).astype(np.float64)
    big = np.inf
    box = np.stack(
        [
            np.where(member, graph.bbox[:, 0], big).min(1),
            np.where(member, graph.bbox[:, 1], big).min(1),
            np.where(member, graph.bbox[:, 2], -big).max(1),
            np.where(member, graph.bbox[:, 3], -big).max(1),
        ],
        axis=1,
    )
    # Colour distinctiveness: histogram of the region vs. that of the segments around it.
    n = len(graph.area)
    adjacency = np.zeros((n, n), dtype=np.float64)
    adjacency[ei, ej] = adjacency[ej, ei] = 1.0
    ring = ((m @ adjacency) > 0) & ~member
    weighted = graph.hist * graph.area[:, None]
    inner_hist = m @ weighted
    ring_hist = ring.astype(np.float64) @ weighted
    inner_hist /= np.maximum(inner_hist.sum(1, keepdims=True), 1e-9)
    ring_hist /= np.maximum(ring_hist.sum(1, keepdims=True), 1e-9)
    similar = np.minimum(inner_hist, ring_hist).sum(1) / 3.0
    return {
        "area": m @ graph.area,
        "border": m @ graph.border,
        "outer_len": cut @ length,
        "outer_diff": cut @ diff,
        "inner_len": inside @ length,
        "inner_diff": inside @ diff,
        "box_area": (box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1]),
        "segments": m.sum(1),
        "distinct": np.where(ring.any(1), 1.0 - similar, 0.0),
    }


def _add_cross_scale_stability(graphs: list[_Graph], pools: list[_Candidates]) -> None:
    """Best IoU of each candidate with any candidate of another scale (exact, no pixels).

    Two segmentations overlap in a (n1, n2) table of shared pixel counts; a union of segments
    of one and a union of the other then intersect in ``M1 @ table @ M2.T`` pixels.
    """
    for pool in pools:
        pool.feats["stability"] = np.zeros(len(pool.member))
    for a in range(len(graphs)):
        for b in range(a + 1, len(graphs)):
            ma = pools[a].member.astype(np.float32)
            mb = pools[b].member.astype(np.float32)
            inter = (ma @ _shared_pixels(graphs[a], graphs[b])) @ mb.T
            union = pools[a].area[:, None] + pools[b].area[None, :] - inter
            iou = inter / np.maximum(union, 1.0)
            pools[a].feats["stability"] = np.maximum(pools[a].feats["stability"], iou.max(1))
            pools[b].feats["stability"] = np.maximum(pools[b].feats["stability"], iou.max(0))


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


def _merge(graph: _Graph, st: _Strategy, pixels: int) -> np.ndarray:
    """Greedy hierarchical merging of adjacent regions; returns every union created."""
    n = len(graph.area)
    area = list(graph.area)
    hist = list(graph.hist)
    bbox = list(graph.bbox)
    nbrs: list[dict[int, tuple[float, float]]] = [{} for _ in range(n)]
    for (i, j), e in graph.edges.items():
        nbrs[i][j] = e
        nbrs[j][i] = e
    alive = [True] * n
    _, _, length, diff = graph.edge_arrays
    mean_diff = float(diff.sum() / max(1.0, length.sum()))

    def similarity(i: int, j: int, e: tuple[float, float]) -> float:
        sim = 0.0
        if st.colour:
            sim += st.colour * float(np.minimum(hist[i], hist[j]).sum()) / 3.0
        if st.edge:
            sim += st.edge * float(np.exp(-e[1] / (e[0] * mean_diff + 1e-9)))
        if st.size:
            sim += st.size * (1.0 - (area[i] + area[j]) / pixels)
        if st.fill:
            bi, bj = bbox[i], bbox[j]
            box = (max(bi[2], bj[2]) - min(bi[0], bj[0])) * (max(bi[3], bj[3]) - min(bi[1], bj[1]))
            sim += st.fill * (1.0 - (box - area[i] - area[j]) / pixels)
        return sim

    heap = [(-similarity(i, j, e), i, j) for (i, j), e in graph.edges.items()]
    heapq.heapify(heap)
    rows: list[np.ndarray] = []
    while heap:
        _, i, j = heapq.heappop(heap)
        if not (alive[i] and alive[j]):
            continue
        k = len(area)
        alive[i] = alive[j] = False
        area.append(area[i] + area[j])
        hist.append((hist[i] * area[i] + hist[j] * area[j]) / area[k])
        bi, bj = bbox[i], bbox[j]
        bbox.append(
            np.array([min(bi[0], bj[0]), min(bi[1], bj[1]), max(bi[2], bj[2]), max(bi[3], bj[3])])
        )
        merged: dict[int, tuple[float, float]] = {}
        for src in (i, j):
            for m, (ln, ds) in nbrs[src].items():
                if m in (i, j):
                    continue
                old = merged.get(m, (0.0, 0.0))
                merged[m] = (old[0] + ln, old[1] + ds)
                del nbrs[m][src]
        nbrs.append(merged)
        alive.append(True)
        for m, em in merged.items():
            nbrs[m][k] = em
            heapq.heappush(heap, (-similarity(k, m, em), m, k))
        row = np.zeros(n, dtype=bool)
        for src in (i, j):
            if src < n:
                row[src] = True
            else:
                row |= rows[src - n]
        rows.append(row)
    return np.stack(rows) if rows else np.zeros((0, n), dtype=bool)
