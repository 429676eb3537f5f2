"""Pre- or post-filtering of an image filter, chosen by its estimated selectivity.

A pre-filter (:func:`~regionsearch.store.region_filters.region_filter`, then a selector inside
the engine) reads every matching image row: ~65 ms CPU for half of 200k images (10M regions,
``benchmarks/results/filter_scale.json``), so a filter that keeps most images costs more than
the search. Such a filter does not need its images enumerated: the unfiltered top ``k'``
(``k' = ceil(k / share * SAFETY)``) holds ``k`` allowed regions with high probability, and
checking ``k'`` candidates is a few dozen primary-key reads. A narrow filter keeps the
pre-filter: post-filtering it would need a huge ``k'``.

The share is estimated without a scan: :data:`SAMPLE` random ids between the smallest and the
largest image id, read by primary key (``WHERE id IN (...)``: ~1.5 ms; ``ORDER BY random()``
scans the table). It only chooses the strategy; correctness never depends on it.

Post-filtering is exact for an exact (Flat) index: candidates are judged by
:func:`region_filter` itself, limited to the candidates' images (``among=``), so the same SQL
decides (SQLite ``GLOB`` and PostgreSQL's regex keep their own semantics); the allowed
candidates, in the engine's order, are the filtered top-k once ``k`` of them are found or the
engine ran out of vectors. A query still short after :data:`MAX_ROUNDS` doublings of ``k'`` is
answered by the pre-filter. On an approximate index the two paths can differ as the engine's
own ranking does (post-filtering sees the index's unfiltered neighbourhood).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from sqlalchemy import Connection, func, select

from .backend import RegionFilter
from .filter_ops import allowed_upper_bound
from .models import Image, Region
from .region_filters import ImageFilter, region_filter
from .sql import chunks, in_list

#: Post-filter only when the filter is estimated to allow at least this share of the regions.
MIN_SHARE = 0.1
#: ``k'`` over-asks the expected need by this factor (a retry costs one more vector search).
SAFETY = 2.0
#: Random image ids probed to estimate the share (standard error <= 0.03 at any share; each
#: id is rendered into two ``IN`` lists, ~2 us apiece).
SAMPLE = 256
#: Fewer live images than this in the sample: no estimate (pre-filter).
MIN_SAMPLED = 16
#: Doublings of ``k'`` tried before a query falls back to the pre-filter.
MAX_ROUNDS = 3
#: No post-filter search asks the engine for more candidates than this.
MAX_CANDIDATES = 4096

#: ``search(queries, k, selector) -> (scores, ids)``: the engine under the reader's lock.
Search = Callable[[np.ndarray, int, RegionFilter | None], tuple[np.ndarray, np.ndarray]]


@dataclass
class FilterPlan:
    """An image filter with its estimated share, and its pre-filter once built (kept for the
    searches of one request: the searcher re-asks with a larger ``k``)."""

    images: ImageFilter
    #: Estimated share of the live regions the filter allows (``None``: not estimated).
    share: float | None
    _selector: RegionFilter | None = field(default=None, repr=False)

    def candidates(self, k: int) -> int | None:
        """``k'`` for a post-filter search, or ``None`` when the pre-filter is the better way."""
        if self.share is None or self.share < MIN_SHARE or k < 1:  # k < 1: the engine's error
            return None
        want = math.ceil(k / self.share * SAFETY)
        return want if want <= MAX_CANDIDATES else None

    def selector(self, conn: Connection, dialect: str) -> RegionFilter:
        """The pre-filter (read once per plan)."""
        if self._selector is None:
            self._selector = region_filter(conn, self.images, dialect)
        return self._selector


def estimate_share(conn: Connection, f: ImageFilter, dialect: str, seed: int = 0) -> float | None:
    """Share of the live regions ``f`` allows, from :data:`SAMPLE` image rows read by primary key
    (exact when the id span is no larger than the sample). Seeded: one filter, one plan."""
    # two scalar subqueries: each one reads an edge of the primary key (``min`` and ``max`` in
    # one SELECT would scan the table on SQLite)
    lo, hi = conn.execute(
        select(
            select(func.min(Image.id)).scalar_subquery(),
            select(func.max(Image.id)).scalar_subquery(),
        )
    ).one()
    if lo is None:
        return None
    exact = hi - lo + 1 <= SAMPLE
    if exact:
        ids = np.arange(lo, hi + 1, dtype=np.int64)
    else:
        ids = np.unique(np.random.default_rng(seed).integers(lo, hi + 1, size=SAMPLE))
    n, live = conn.execute(
        select(func.count(), func.coalesce(func.sum(Image.live_regions), 0)).where(
            in_list(Image.id, ids.tolist()), Image.live_regions > 0
        )
    ).one()
    if not live or (not exact and n < MIN_SAMPLED):
        return None
    allowed = allowed_upper_bound(region_filter(conn, f, dialect, among=ids))
    return allowed / int(live)


def plan_filter(conn: Connection, f: ImageFilter, dialect: str) -> FilterPlan:
    """``f`` with its estimated share (no scan of the image rows)."""
    return FilterPlan(images=f, share=estimate_share(conn, f, dialect))


def allowed_candidates(
    conn: Connection, f: ImageFilter, dialect: str, ids: np.ndarray
) -> np.ndarray:
    """Which of the region ``ids`` (unique, >= 0) ``f`` allows: their images' rows judged by
    the filter's own SQL (:func:`region_filter` ``among`` those images)."""
    if not ids.size:
        return np.zeros(0, dtype=bool)
    images: list[int] = []
    for chunk in chunks(ids.tolist()):
        images += conn.execute(
            select(Region.image_id).where(in_list(Region.id, chunk)).distinct()
        ).scalars()
    return region_filter(conn, f, dialect, among=images).allows(ids)


def post_filtered_search(
    conn: Connection,
    dialect: str,
    plan: FilterPlan,
    queries: np.ndarray,
    k: int,
    search: Search,
) -> tuple[np.ndarray, np.ndarray]:
    """Filtered top-``k`` of each query by post-filtering unfiltered candidates (growing ``k'``),
    the pre-filter for queries still short after :data:`MAX_ROUNDS` (see the module doc)."""
    nq = len(queries)
    scores_out = np.full((nq, k), -np.inf, dtype=np.float32)
    ids_out = np.full((nq, k), -1, dtype=np.int64)
    todo = np.arange(nq)
    want = plan.candidates(k)
    for _ in range(MAX_ROUNDS):
        if want is None or not todo.size:
            break
        scores, ids = search(queries[todo], want, None)
        valid = ids >= 0
        cands = np.unique(ids[valid])
        ok = cands[allowed_candidates(conn, plan.images, dialect, cands)]
        allowed = valid & np.isin(ids, ok)
        done = np.zeros(todo.size, dtype=bool)
        for row, q in enumerate(todo.tolist()):
            keep = np.flatnonzero(allowed[row])[:k]
            if keep.size == k or int(valid[row].sum()) < want:  # k found, or nothing left
                scores_out[q, : keep.size] = scores[row, keep]
                ids_out[q, : keep.size] = ids[row, keep]
                done[row] = True
        todo = todo[~done]
        want = want * 2 if want * 2 <= MAX_CANDIDATES else None
    if todo.size:
        scores, ids = search(queries[todo], k, plan.selector(conn, dialect))
        scores_out[todo], ids_out[todo] = scores, ids
    return scores_out, ids_out
