"""A :class:`~regionsearch.store.backend.RegionFilter` as a FAISS ``IDSelector``, built in bulk.

A filter is a handful of half-open id ranges (one per image: region ids are contiguous per
image) plus a few single ids. FAISS asks the selector about every candidate id during a scan,
so the selector must answer in O(1) and must be cheap to build from a large filter:

- one range and nothing else -> ``IDSelectorRange`` (built in O(1));
- anything else -> ``IDSelectorBitmap`` over ``[0, span)``, painted a byte at a time from the
  merged ranges (:func:`~regionsearch.store.filter_ops.filter_bits`: no per-id or per-image
  Python loop), single ids set, excluded ids (tombstones) cleared. At 10M ids that is ~1 ms
  and 1.25 MB; a ``IDSelectorBatch`` (hash set) over the same ids needs the id list in Python
  first and costs ~100x more to build (see ``docs/architecture.md``, store section).

Ids outside ``[0, span)`` are never allowed, so ``span`` is clipped to the largest id the
engine stores (``max_id + 1``): the bitmap never grows past the index it filters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np

from .backend import RegionFilter
from .filter_ops import (
    allowed_ids,
    allowed_upper_bound,
    extra_ids,
    filter_bits,
    filter_mask,
    merged_ranges,
    normalized_ranges,
    paint_bits,
)


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
    no_exclude = exclude is None or not len(exclude)
    ranges = merged_ranges(normalized_ranges(filt, span))
    ids = extra_ids(filt)
    if no_exclude and not ids.size and len(ranges) == 1:  # e.g. a folder indexed in one go
        return FaissSelector(faiss.IDSelectorRange(int(ranges[0, 0]), int(ranges[0, 1])))
    bits = paint_bits(ranges, ids, span, None if no_exclude else exclude)
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
    "filter_bits",
    "filter_mask",
    "merged_ranges",
    "normalized_ranges",
    "region_selector",
]
