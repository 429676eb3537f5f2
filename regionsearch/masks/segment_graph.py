"""The segment graph behind :class:`~regionsearch.masks.proposals.AutomaticProposals`.

One over-segmentation becomes a region adjacency graph with per-segment colour histograms,
boxes and boundary statistics (:func:`build_graph`); greedy hierarchical merging under a few
similarity orders (:data:`MERGE_STRATEGIES`) turns it into candidate regions, each a union of
segments held as a row of a membership matrix (:func:`candidates`). Every statistic a candidate
is scored on (:func:`candidate_features`, :func:`add_cross_scale_stability`) comes from the
segment level by matrix products, so no candidate mask is ever drawn in pixels.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

HIST_BINS = 16  # per Lab channel; colour similarity = histogram intersection


@dataclass(frozen=True)
class MergeStrategy:
    """Weights of one merge order; different orders give different (complementary) unions."""

    colour: float
    edge: float
    size: float
    fill: float


# Colour+size is the classic selective-search order; edge-driven merging follows image
# boundaries (closest to an ultrametric contour map); fill favours compact unions.
MERGE_STRATEGIES: tuple[MergeStrategy, ...] = (
    MergeStrategy(colour=1.0, edge=1.0, size=1.0, fill=1.0),
    MergeStrategy(colour=0.0, edge=1.0, size=1.0, fill=0.0),
    MergeStrategy(colour=1.0, edge=0.0, size=1.0, fill=1.0),
)


@dataclass
class SegmentGraph:
    """Region adjacency graph of one over-segmentation, with per-segment statistics."""

    labels: np.ndarray  # (h, w) int32, values 0..n-1
    area: np.ndarray  # (n,) pixel counts
    hist: np.ndarray  # (n, 3 * HIST_BINS) L1-normalised colour histograms
    bbox: np.ndarray  # (n, 4) min_row, min_col, max_row + 1, max_col + 1
    border: np.ndarray  # (n,) pixels on the image border
    edges: dict[tuple[int, int], tuple[float, float]]  # (i<j) -> (boundary length, diff sum)
    edge_arrays: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # i, j, length, diff


@dataclass
class Candidates:
    """Candidate regions of one segmentation as rows of a membership matrix over segments."""

    member: np.ndarray  # (r, n) bool
    feats: dict[str, np.ndarray]  # per-candidate statistics, see candidate_features
    score: np.ndarray  # (r,) float, filled in once all scales are known

    @property
    def area(self) -> np.ndarray:
        return self.feats["area"]


def shared_pixels(a: SegmentGraph, b: SegmentGraph) -> np.ndarray:
    """(n_a, n_b) float32 table of pixels in segment i of ``a`` and segment j of ``b``."""
    if a is b:
        return np.diag(a.area).astype(np.float32)
    na, nb = len(a.area), len(b.area)
    counts = np.bincount(a.labels.ravel() * nb + b.labels.ravel(), minlength=na * nb)
    return counts.reshape(na, nb).astype(np.float32)


def build_graph(labels: np.ndarray, lab: np.ndarray) -> SegmentGraph:
    """Segment statistics and 4-neighbour adjacency with boundary length and colour contrast."""
    _, inverse = np.unique(labels, return_inverse=True)
    labels = inverse.reshape(labels.shape).astype(np.int32)
    n = int(labels.max()) + 1
    area = np.bincount(labels.ravel(), minlength=n).astype(np.float64)

    quant = np.clip(
        (
            (lab - np.array([0.0, -100.0, -100.0], np.float32))
            / np.array([100.0, 200.0, 200.0], np.float32)
            * HIST_BINS
        ).astype(np.int64),
        0,
        HIST_BINS - 1,
    )
    hist = np.concatenate(
        [
            np.bincount(
                labels.ravel() * HIST_BINS + quant[..., c].ravel(), minlength=n * HIST_BINS
            ).reshape(n, HIST_BINS)
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
    return SegmentGraph(
        labels=labels,
        area=area,
        hist=hist,
        bbox=bbox,
        border=border,
        edges=edges,
        edge_arrays=edge_arrays,
    )


def candidates(graph: SegmentGraph, pixels: int) -> Candidates:
    """All segments plus every union created by each merge strategy, with their statistics."""
    n = len(graph.area)
    member = np.concatenate(
        [np.eye(n, dtype=bool)] + [merge_greedily(graph, st, pixels) for st in MERGE_STRATEGIES],
        axis=0,
    )
    # The same union often comes out of several strategies: keep each distinct one once and
    # remember how many strategies agreed on it (a cheap stability cue).
    _, first, counts = np.unique(
        np.packbits(member, axis=1), axis=0, return_index=True, return_counts=True
    )
    order = np.argsort(first)
    member = member[first[order]]
    feats = candidate_features(graph, member)
    feats["support"] = counts[order].astype(np.float64)
    return Candidates(member=member, feats=feats, score=np.zeros(len(member)))


def candidate_features(graph: SegmentGraph, member: np.ndarray) -> dict[str, np.ndarray]:
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


def add_cross_scale_stability(graphs: list[SegmentGraph], pools: list[Candidates]) -> None:
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
            inter = (ma @ shared_pixels(graphs[a], graphs[b])) @ mb.T
            union = pools[a].area[:, None] + pools[b].area[None, :] - inter
            iou = inter / np.maximum(union, 1.0)
            pools[a].feats["stability"] = np.maximum(pools[a].feats["stability"], iou.max(1))
            pools[b].feats["stability"] = np.maximum(pools[b].feats["stability"], iou.max(0))


def merge_greedily(graph: SegmentGraph, st: MergeStrategy, pixels: int) -> np.ndarray:
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
