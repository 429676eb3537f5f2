"""Numpy operations on a :class:`~regionsearch.store.backend.RegionFilter` (no engine inside).

Engines and the index use these to size, expand and combine filters without Python loops
over ids; :mod:`regionsearch.store.faiss_filters` turns a filter into a FAISS selector.
"""

from __future__ import annotations

import numpy as np

from .backend import RegionFilter


def normalized_ranges(filt: RegionFilter, span: int | None = None) -> np.ndarray:
    """The filter's ranges as ``(n, 2)`` int64, clipped to ``[0, span)``, empty ones dropped."""
    ranges = np.asarray(filt.id_ranges, dtype=np.int64).reshape(-1, 2)
    if not ranges.size:
        return np.empty((0, 2), np.int64)
    lo = np.maximum(ranges[:, 0], 0)
    hi = ranges[:, 1] if span is None else np.minimum(ranges[:, 1], span)
    keep = hi > lo
    return np.stack([lo[keep], hi[keep]], axis=1)


def extra_ids(filt: RegionFilter) -> np.ndarray:
    """The filter's single ids (int64, possibly empty)."""
    if filt.ids is None:
        return np.empty(0, np.int64)
    return np.asarray(filt.ids, dtype=np.int64).ravel()


def allowed_upper_bound(filt: RegionFilter) -> int:
    """How many ids the filter can allow at most (range lengths + single ids)."""
    ranges = normalized_ranges(filt)
    return int((ranges[:, 1] - ranges[:, 0]).sum()) + int(extra_ids(filt).size)


def allowed_ids(filt: RegionFilter) -> np.ndarray:
    """Every id the filter allows, sorted and unique (for small filters: see
    :func:`allowed_upper_bound`); the ranges are expanded without a Python loop."""
    ranges = normalized_ranges(filt)
    lens = ranges[:, 1] - ranges[:, 0]
    firsts = np.cumsum(lens) - lens
    expanded = np.repeat(ranges[:, 0] - firsts, lens) + np.arange(int(lens.sum()), dtype=np.int64)
    ids = extra_ids(filt)
    return np.unique(np.concatenate([expanded, ids[ids >= 0]]))


def filter_mask(filt: RegionFilter, span: int) -> np.ndarray:
    """Boolean mask over ids ``[0, span)``: which the filter allows (one ``cumsum`` paints
    every range: +1 at each start, -1 at each stop)."""
    span = max(int(span), 0)
    ranges = normalized_ranges(filt, span)
    delta = np.zeros(span + 1, dtype=np.int32)
    np.add.at(delta, ranges[:, 0], 1)
    np.add.at(delta, ranges[:, 1], -1)
    mask = np.cumsum(delta[:span], dtype=np.int32) > 0
    ids = extra_ids(filt)
    mask[ids[(ids >= 0) & (ids < span)]] = True
    return mask


def intersect(a: RegionFilter, b: RegionFilter) -> RegionFilter:
    """The ids both filters allow, as explicit ids (the smaller side is expanded: meant for
    combining an image filter with a short list, e.g. an image's own regions)."""
    small, other = (a, b) if allowed_upper_bound(a) <= allowed_upper_bound(b) else (b, a)
    ids = allowed_ids(small)
    return RegionFilter.from_ids(ids[other.allows(ids)])
