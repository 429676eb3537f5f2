"""The read side of :class:`~regionsearch.store.milvus.MilvusBackend`: top-k and range search.

Kept apart from the collection's write and lifecycle code (``milvus.py``) because the search
logic has its own subtleties: a :class:`RegionFilter` may become several bounded filter
expressions whose partial results are merged, and a range search is emulated by top-k searches
with a doubling k, splitting the id space where Milvus's k limit is reached.

The mixin expects the backend's attributes: ``_client`` (a ``MilvusClient``), ``location``
(:class:`~regionsearch.store.milvus_location.MilvusLocation`), ``dimension``, ``max_topk``,
``filter_terms``, ``_exists`` and ``_unlabelled``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .backend import RegionFilter
from .milvus_collection import ID
from .milvus_filters import filter_expressions
from .vector_checks import VectorValidationError, check_k, check_queries

#: Milvus servers cap k (``topk``) at 16384 by default.
MAX_TOPK = 16384
#: First k of a range search (doubled until the k-th score falls below the threshold).
RANGE_FIRST_K = 64


class MilvusSearch:
    """Top-k and range search over the backend's collection (see the module docstring)."""

    _client: Any
    location: Any
    dimension: int
    max_topk: int
    filter_terms: int
    _exists: bool
    _unlabelled: bool

    def _expressions(self, selector: RegionFilter | None) -> list[str]:
        if selector is None:
            return [""]
        return filter_expressions(
            selector, image_field_usable=not self._unlabelled, max_terms=self.filter_terms
        )

    def _search(
        self, queries: np.ndarray, limit: int, expr: str, params: dict[str, Any]
    ) -> list[list[tuple[float, int]]]:
        result = self._client.search(
            self.location.collection,
            data=list(queries),
            limit=limit,
            filter=expr,
            output_fields=[ID],
            search_params={"metric_type": "IP", "params": params},
            consistency_level=self.location.consistency,
        )
        return [[(float(h["distance"]), int(h["id"])) for h in hits] for hits in result]

    def search(
        self, queries: Any, k: int, selector: RegionFilter | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """k nearest by inner product, best first, padded with (-inf, -1)."""
        q = check_queries(queries, self.dimension)
        k = check_k(k)
        if k > self.max_topk:
            raise VectorValidationError(f"k={k} is above Milvus's limit of {self.max_topk} results")
        scores = np.full((len(q), k), -np.inf, dtype=np.float32)
        found = np.full((len(q), k), -1, dtype=np.int64)
        expressions = self._expressions(selector) if self._exists else []
        hits: list[list[tuple[float, int]]] = [[] for _ in range(len(q))]
        for expr in expressions:
            for row, part in enumerate(self._search(q, k, expr, self.location.search_params)):
                hits[row] += part
        for row, candidates in enumerate(hits):
            best = _best(candidates, k)
            scores[row, : len(best)] = [s for s, _ in best]
            found[row, : len(best)] = [i for _, i in best]
        return scores, found

    def range_search(
        self, query: Any, threshold: float, selector: RegionFilter | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Every vector scoring >= ``threshold``, best first.

        Top-k searches with k doubling until the k-th score falls below ``threshold``; past
        Milvus's k limit, the id space is split at the median id of the saturated result and
        each half searched the same way. Milvus's own range search (``radius``) is not used:
        Milvus Lite answers it from an over-fetched top-k, so deep results would be missed.
        """
        q = check_queries(query, self.dimension)
        if len(q) != 1:
            raise VectorValidationError("range_search takes one query")
        found: dict[int, float] = {}
        for expr in self._expressions(selector) if self._exists else []:
            self._range_part(q, float(threshold), expr, None, found)
        best = _best([(s, i) for i, s in found.items()], len(found))
        return (
            np.asarray([s for s, _ in best], dtype=np.float32),
            np.asarray([i for _, i in best], dtype=np.int64),
        )

    def _range_part(
        self,
        q: np.ndarray,
        threshold: float,
        expr: str,
        bounds: tuple[int, int] | None,
        found: dict[int, float],
    ) -> None:
        where = expr
        if bounds is not None:
            part = f"(id >= {bounds[0]} and id < {bounds[1]})"
            where = f"({expr}) and {part}" if expr else part
        k = min(RANGE_FIRST_K, self.max_topk)
        while True:
            page = self._search(q, k, where, self.location.search_params)[0]
            saturated = len(page) == k and page[-1][0] >= threshold
            if not saturated or k == self.max_topk:
                break
            k = min(2 * k, self.max_topk)
        found.update((i, s) for s, i in page if s >= threshold)
        if not saturated:
            return
        lo, hi = bounds if bounds is not None else (0, int(np.iinfo(np.int64).max))
        mid = max(int(np.median([i for _, i in page])), lo + 1)
        if hi - lo > 1:
            self._range_part(q, threshold, expr, (lo, mid), found)
            self._range_part(q, threshold, expr, (mid, hi), found)


def _best(candidates: list[tuple[float, int]], k: int) -> list[tuple[float, int]]:
    """Top-k of (score, id) pairs from several partial searches, one entry per id."""
    unique = dict((i, s) for s, i in candidates)
    ranked = sorted(((s, i) for i, s in unique.items()), key=lambda p: (-p[0], p[1]))
    return ranked[:k]
