"""Searching one sealed or growing FAISS segment, and merging per-segment results.

A segment is an ``IndexIDMap`` whose id table is sorted, so an id's position is one
``np.searchsorted`` (no reverse hash map to build when it is opened). Selectors are given in
region ids and translated to positions here (``IDSelectorTranslated``) because ``IndexIDMap``
only translates the top-level search parameters, not those nested in a pre-transform (OPQ) or a
refinement layer.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np

from .backend import RegionFilter
from .faiss_filters import allowed_ids, allowed_upper_bound, exclude_selector, region_selector
from .faiss_util import brute_force_search, layer_params

SEAL_CHUNK = 65_536  # vectors copied at a time when sealing (bounds the temporary copy)


@dataclass
class Segment:
    """An opened segment: the FAISS index and a zero-copy view of its id table."""

    name: str
    index: Any  # faiss.IndexIDMap (memory-mapped when sealed)
    ids: np.ndarray  # position -> region id (sorted for sealed segments)
    sorted_ids: bool = True
    _direct_map: bool = field(default=False, repr=False)

    @classmethod
    def wrap(cls, name: str, index: Any, sorted_ids: bool = True) -> Segment:
        return cls(name, index, id_view(index), sorted_ids)

    @property
    def n(self) -> int:
        return int(self.index.ntotal)

    @property
    def exact(self) -> bool:
        return isinstance(faiss.downcast_index(self.index.index), faiss.IndexFlat)

    @property
    def min_id(self) -> int:
        if not self.ids.size:
            return -1
        return int(self.ids[0]) if self.sorted_ids else int(self.ids.min())

    @property
    def max_id(self) -> int:
        if not self.ids.size:
            return -1
        return int(self.ids[-1]) if self.sorted_ids else int(self.ids.max())

    def positions(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(present mask over ``ids``, positions of the present ones)."""
        table = self.ids
        if table.size == 0 or ids.size == 0:
            return np.zeros(ids.shape, bool), np.empty(0, np.int64)
        if self.sorted_ids:
            pos = np.searchsorted(table, ids)
            clipped = np.minimum(pos, table.size - 1)
            mask = table[clipped] == ids
            return mask, clipped[mask].astype(np.int64)
        order = np.argsort(table, kind="stable")
        pos = np.searchsorted(table[order], ids)
        clipped = np.minimum(pos, table.size - 1)
        mask = table[order][clipped] == ids
        return mask, order[clipped[mask]].astype(np.int64)

    def vectors(self, positions: np.ndarray) -> np.ndarray:
        """Stored vectors at ``positions`` (decoded for compressed segments)."""
        if not self._direct_map:  # IVF reconstructs by position through a direct map
            ivf = faiss.try_extract_index_ivf(self.index.index)
            if ivf is not None and ivf.direct_map.no():
                ivf.make_direct_map()
            self._direct_map = True
        if positions.size == 0:
            return np.empty((0, self.index.d), np.float32)
        return self.index.index.reconstruct_batch(np.ascontiguousarray(positions, np.int64))


def check_knobs(knobs: dict[str, Any]) -> dict[str, Any]:
    """Search knobs given (``None`` values dropped); an unknown name is a ``ValueError``."""
    unknown = set(knobs) - {"nprobe", "k_factor"}
    if unknown:
        raise ValueError(f"unknown search knobs {sorted(unknown)} (nprobe, k_factor)")
    return {k: v for k, v in knobs.items() if v is not None}


def set_knobs(index: Any, nprobe: int | None = None, k_factor: float | None = None) -> None:
    """Set a segment's search knobs (IVF lists probed, refinement's re-ranked candidates per
    result); a knob its structure lacks is ignored."""
    inner = faiss.downcast_index(index.index)
    if k_factor is not None and isinstance(inner, faiss.IndexRefine):
        inner.k_factor = float(k_factor)
    ivf = faiss.try_extract_index_ivf(index.index)
    if nprobe is not None and ivf is not None:
        ivf.nprobe = min(int(nprobe), int(ivf.nlist))


def live_positions(
    seg: Segment, tombs: dict[str, np.ndarray], ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(mask over ``ids`` of those live in ``seg``, their positions in it)."""
    present, pos = seg.positions(ids)
    dead = tombs.get(seg.name)
    if dead is not None and dead.size and present.any():
        alive = ~np.isin(ids[present], dead)
        present[present] = alive
        pos = pos[alive]
    return present, pos


def contains_ids(
    segments: list[Segment], tombs: dict[str, np.ndarray], ids: np.ndarray
) -> np.ndarray:
    """Mask over ``ids`` of those live in any of ``segments``."""
    mask = np.zeros(ids.shape, bool)
    for seg in segments:
        if seg.n:
            mask |= live_positions(seg, tombs, ids)[0]
    return mask


def live_ids(segments: list[Segment], tombs: dict[str, np.ndarray]) -> np.ndarray:
    """Every live id of ``segments``, sorted."""
    parts = []
    for seg in sorted((s for s in segments if s.n), key=lambda s: s.min_id):
        dead = tombs.get(seg.name)
        parts.append(seg.ids if dead is None else seg.ids[~np.isin(seg.ids, dead)])
    out = np.concatenate(parts) if parts else np.empty(0, np.int64)
    if out.size > 1 and not (out[1:] > out[:-1]).all():
        out = np.sort(out)
    return out


def gather_vectors(
    segments: list[Segment], tombs: dict[str, np.ndarray], ids: np.ndarray, dimension: int
) -> np.ndarray:
    """The stored vectors of live ``ids`` (``KeyError`` naming ids no segment holds)."""
    out = np.empty((ids.size, dimension), np.float32)
    found = np.zeros(ids.size, bool)
    for seg in segments:
        live, pos = live_positions(seg, tombs, ids)
        if live.any():
            out[live] = seg.vectors(pos)
            found |= live
    if not found.all():
        raise KeyError(f"ids not in the index: {ids[~found][:5].tolist()}")
    return out


def id_view(index: Any) -> np.ndarray:
    """Zero-copy view of an ``IndexIDMap``'s id table (valid while ``index`` lives)."""
    n = index.id_map.size()
    if n == 0:
        return np.empty(0, np.int64)
    return faiss.rev_swig_ptr(index.id_map.data(), n)


def _inner_params(segment: Segment, sel: Any, keep: list[Any]) -> Any:
    if sel is None:
        return None
    translated = faiss.IDSelectorTranslated(segment.index.id_map, sel)
    keep.append(translated)
    return layer_params(segment.index.index, translated, keep)


def search_segment(
    segment: Segment, queries: np.ndarray, k: int, sel: Any
) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` of one segment: (scores, region ids), -inf / -1 where it has fewer."""
    keep: list[Any] = []
    params = _inner_params(segment, sel, keep)
    k_eff = min(k, segment.n)
    scores, labels = segment.index.index.search(queries, k_eff, params=params)
    ids = np.where(labels >= 0, segment.ids[np.maximum(labels, 0)], -1)
    scores = np.where(labels >= 0, scores, -np.inf).astype(np.float32)
    return scores, ids


def range_search_segment(
    segment: Segment, query: np.ndarray, threshold: float, sel: Any
) -> tuple[np.ndarray, np.ndarray]:
    """Every (score, id) of one segment with score >= ``threshold`` for one query (unsorted)."""
    keep: list[Any] = []
    params = _inner_params(segment, sel, keep)
    # FAISS keeps IP results strictly above the radius: lower it by one ulp for ">=".
    radius = float(np.nextafter(np.float32(threshold), np.float32(-np.inf)))
    _lims, scores, labels = segment.index.index.range_search(query, radius, params=params)
    ok = scores >= threshold
    return scores[ok].astype(np.float32), segment.ids[labels[ok]]


Parts = list[tuple["Segment", Any, list[Any]]]
"""(segment, FAISS selector or None, objects it points into): :func:`segment_selectors`."""
Subset = tuple[np.ndarray, np.ndarray] | None
"""(ids, vectors) of a tiny filter, scored exactly (IVF could miss a few), else None."""


def exact_subset(
    segments: list[Segment],
    tombs: dict[str, np.ndarray],
    selector: RegionFilter | None,
    limit: int,
    dimension: int,
) -> Subset:
    """(ids, vectors) of a tiny filter's live ids (at most ``limit``), to score exactly when
    a segment is ANN (graph and IVF scans can miss a handful of allowed ids); else None."""
    if selector is None or selector.is_empty or all(s.exact for s in segments if s.n):
        return None
    if allowed_upper_bound(selector) > limit:
        return None
    ids = allowed_ids(selector)
    ids = ids[contains_ids(segments, tombs, ids)]
    return ids, gather_vectors(segments, tombs, ids, dimension)


def search_segments(
    parts: Parts, q: np.ndarray, k: int, selector: RegionFilter | None, subset: Subset
) -> tuple[np.ndarray, np.ndarray]:
    """Top ``k`` over every segment for ``q``, or over ``subset`` exactly when given."""
    if selector is not None and selector.is_empty:
        return merge_topk([], q.shape[0], k)
    if subset is not None:
        return brute_force_search(subset[1], subset[0], q, k)
    return merge_topk([search_segment(seg, q, k, sel) for seg, sel, _ in parts], q.shape[0], k)


def range_search_segments(
    parts: Parts, q: np.ndarray, threshold: float, selector: RegionFilter | None, subset: Subset
) -> tuple[np.ndarray, np.ndarray]:
    """Every (score, id) with score >= ``threshold`` for one query ``q``, best first."""
    if selector is not None and selector.is_empty:
        return np.empty(0, np.float32), np.empty(0, np.int64)
    if subset is not None:
        scores = (q @ subset[1].T)[0]
        hit = scores >= threshold
        found = [(scores[hit].astype(np.float32), subset[0][hit])]
    else:
        found = [range_search_segment(seg, q, threshold, sel) for seg, sel, _ in parts]
    scores = np.concatenate([p[0] for p in found]) if found else np.empty(0, np.float32)
    ids = np.concatenate([p[1] for p in found]) if found else np.empty(0, np.int64)
    order = np.lexsort((ids, -scores))
    return scores[order], ids[order].astype(np.int64)


def merge_topk(
    parts: list[tuple[np.ndarray, np.ndarray]], nq: int, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` per query over per-segment results, padded with (-inf, -1); ties by id."""
    out_s = np.full((nq, k), -np.inf, np.float32)
    out_i = np.full((nq, k), -1, np.int64)
    if not parts:
        return out_s, out_i
    scores = np.concatenate([p[0] for p in parts], axis=1)
    ids = np.concatenate([p[1] for p in parts], axis=1)
    # sort by score descending, then id ascending (a deterministic order across segmentings)
    order = np.lexsort((ids, -scores), axis=1) if scores.shape[1] else None
    if order is None:
        return out_s, out_i
    kk = min(k, scores.shape[1])
    best = order[:, :kk]
    out_s[:, :kk] = np.take_along_axis(scores, best, axis=1)
    out_i[:, :kk] = np.take_along_axis(ids, best, axis=1)
    out_i[~np.isfinite(out_s)] = -1
    return out_s, out_i


def segment_selectors(
    segments: list[Segment], tombs: dict[str, np.ndarray], selector: RegionFilter | None
) -> list[tuple[Segment, Any, list[Any]]]:
    """(segment, FAISS selector or None, objects the selector points into) for each non-empty
    segment: the filter (one bitmap shared by all segments) AND NOT the segment's tombstones."""
    live = [s for s in segments if s.n]
    shared = None
    if selector is not None:
        if not isinstance(selector, RegionFilter):
            raise TypeError(
                f"selector must be a RegionFilter or None, got {type(selector).__name__} "
                "(wrap an id list with RegionFilter.from_ids)"
            )
        shared = region_selector(selector, max_id=max((s.max_id for s in live), default=-1))
    out = []
    for seg in live:
        keep: list[Any] = [shared]
        sel = None if shared is None else shared.selector
        dead = tombs.get(seg.name)
        if dead is not None and dead.size:
            not_tomb = exclude_selector(dead)
            sel = not_tomb.selector if sel is None else faiss.IDSelectorAnd(sel, not_tomb.selector)
            keep += [not_tomb, sel]
        out.append((seg, sel, keep))
    return out


def sealed_indexes(growing: Segment, dead: np.ndarray | None, segment_size: int) -> Iterator[Any]:
    """The growing segment as indexes to seal: ids sorted, ``dead`` (a mask) left out, at most
    ``segment_size`` vectors each. Usually (ids added in order, nothing removed) the growing
    index itself is written, without a copy."""
    ids = growing.ids
    if ids.size == 0:
        return
    in_order = ids.size < 2 or bool((ids[1:] > ids[:-1]).all())
    if dead is None and in_order and ids.size <= segment_size:
        yield growing.index
        return
    keep = np.arange(ids.size) if dead is None else np.flatnonzero(~dead)
    positions = keep[np.argsort(ids[keep], kind="stable")]
    for start in range(0, positions.size, segment_size):
        chunk = positions[start : start + segment_size]
        index = faiss.IndexIDMap(faiss.IndexFlatIP(growing.index.d))
        for part in np.array_split(chunk, -(-chunk.size // SEAL_CHUNK)):
            index.add_with_ids(growing.vectors(part), ids[part].copy())
        yield index
