"""A :class:`~regionsearch.store.backend.RegionFilter` as a FAISS ``IDSelector``, built in bulk.

A filter is a handful of half-open id ranges (one per image: region ids are contiguous per
image) plus a few single ids. FAISS asks the selector about every candidate id during a scan,
so the selector must answer in O(1) and must be cheap to build from a large filter:

- one range and nothing else -> ``IDSelectorRange`` (built in O(1));
- anything else -> ``IDSelectorBitmap`` over ``[0, span)``: the ranges are painted with one
  ``np.cumsum`` over a +1/-1 delta array, the single ids set by fancy indexing, excluded ids
  (tombstones) cleared, then ``np.packbits``. At 1M ids that is ~1 ms and 125 KB; a
  ``IDSelectorBatch`` (hash set) over the same ids needs the id list in Python first and
  costs ~100x more to build (see ``docs/architecture.md``, store section).

Ids outside ``[0, span)`` are never allowed, so ``span`` is clipped to the largest id the
engine stores (``max_id + 1``): the bitmap never grows past the index it filters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import faiss
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


def filter_mask(filt: RegionFilter, span: int) -> np.ndarray:
    """Boolean mask over ids ``[0, span)``: which the filter allows (vectorised, no Python loop)."""
    span = max(int(span), 0)
    ranges = normalized_ranges(filt, span)
    delta = np.zeros(span + 1, dtype=np.int32)
    np.add.at(delta, ranges[:, 0], 1)
    np.add.at(delta, ranges[:, 1], -1)
    mask = np.cumsum(delta[:span], dtype=np.int32) > 0
    ids = extra_ids(filt)
    ids = ids[(ids >= 0) & (ids < span)]
    mask[ids] = True
    return mask


def allowed_ids(filt: RegionFilter) -> np.ndarray:
    """Every id the filter allows, sorted and unique (for small filters: see
    :func:`allowed_upper_bound`); the ranges are expanded without a Python loop."""
    ranges = normalized_ranges(filt)
    lens = ranges[:, 1] - ranges[:, 0]
    firsts = np.cumsum(lens) - lens
    expanded = np.repeat(ranges[:, 0] - firsts, lens) + np.arange(int(lens.sum()), dtype=np.int64)
    ids = extra_ids(filt)
    return np.unique(np.concatenate([expanded, ids[ids >= 0]]))


@dataclass
class FaissSelector:
    """An ``IDSelector`` and the objects it points into (FAISS does not own them)."""

    selector: Any
    keepalive: tuple[Any, ...] = ()


def region_selector(
    filt: RegionFilter, *, max_id: int, exclude: np.ndarray | None = None
) -> FaissSelector:
    """A selector allowing what ``filt`` allows among ids ``<= max_id``, minus ``exclude``."""
    span = max(int(max_id) + 1, 0)
    ranges = normalized_ranges(filt, span)
    ids = extra_ids(filt)
    no_exclude = exclude is None or not len(exclude)
    if len(ranges) == 1 and not ids.size and no_exclude:
        sel = faiss.IDSelectorRange(int(ranges[0, 0]), int(ranges[0, 1]))
        return FaissSelector(sel)
    mask = filter_mask(filt, span)
    if not no_exclude:
        ex = np.asarray(exclude, dtype=np.int64)
        mask[ex[(ex >= 0) & (ex < span)]] = False
    bits = np.packbits(mask, bitorder="little")
    if not bits.size:  # an empty bitmap still needs a valid pointer
        bits = np.zeros(1, dtype=np.uint8)
    sel = faiss.IDSelectorBitmap(int(bits.size), faiss.swig_ptr(bits))
    return FaissSelector(sel, (bits,))


def exclude_selector(exclude: np.ndarray) -> FaissSelector:
    """A selector rejecting ``exclude`` (tombstones) and allowing every other id."""
    batch = faiss.IDSelectorBatch(np.ascontiguousarray(exclude, dtype=np.int64))
    return FaissSelector(faiss.IDSelectorNot(batch), (batch,))


__all__ = [
    "FaissSelector",
    "allowed_ids",
    "allowed_upper_bound",
    "exclude_selector",
    "filter_mask",
    "normalized_ranges",
    "region_selector",
]
