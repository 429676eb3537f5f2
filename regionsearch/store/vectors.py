"""FAISS vector store keyed by region id (``IndexIDMap2``), inner product on normalised vectors.

``VectorStore`` wraps one FAISS index built from a factory string and is the FAISS
:class:`~regionsearch.store.backend.VectorBackend`: bound to a file (``open`` / ``path=``),
``commit`` saves it atomically and ``refresh`` reloads it when a writer replaced it. The
outermost layer is always ``IDMap2`` so that FAISS ids are the SQL region ids and vectors can
be looked up by id (``"IVF256,Flat"`` is stored as ``"IDMap2,IVF256,Flat"``). The default,
``"IDMap2,Flat"``, is exact inner product. Any factory string works (``"IVF1024,Flat"``,
``"HNSW32"``, ``"IVF4096,PQ32"``, ``"OPQ32,IVF4096,PQ32,RFlat"``, ...).

Training and removal: see :mod:`~regionsearch.store.faiss_store`.

Filtered search
    ``search(..., selector=RegionFilter)`` runs inside FAISS with ``SearchParameters(sel=...)``
    of the right class for each layer (:func:`~regionsearch.store.faiss_util.layer_params`);
    the selector (:mod:`~regionsearch.store.faiss_filters`: a range or a bitmap, tombstones
    cleared) is translated to FAISS's internal positions here (``IDSelectorTranslated``),
    because ``IDMap2`` only translates the top-level parameters. Approximate graph/IVF indexes
    can miss allowed ids when the filter is tiny, so a filter of at most
    ``exact_filter_limit`` ids is scored exactly against the stored vectors instead (a
    pre-filter, not a post-filter: results are never cut below k by the filter).

Persistence and GPU: :mod:`~regionsearch.store.faiss_files` (atomic files, memory mapping)
and :mod:`~regionsearch.store.faiss_gpu` (a lazily refreshed GPU replica for unfiltered k-NN).
Not thread-safe for concurrent mutation and search; ``RegionIndex`` serialises access.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from . import faiss_files
from .backend import RegionFilter
from .faiss_filters import (
    FaissSelector,
    allowed_ids,
    allowed_upper_bound,
    exclude_selector,
    region_selector,
)
from .faiss_gpu import is_gpu_index
from .faiss_store import FaissIdStore
from .faiss_util import (
    DEFAULT_FACTORY,
    GPU_MAX_K,
    METRIC,
    ReadOnlyError,
    VectorStoreError,
    brute_force_search,
    default_train_size,
    layer_params,
    normalize_factory,
    ranked_ranges,
    topk,
)
from .vector_checks import VectorValidationError, check_ids, check_queries

log = logging.getLogger(__name__)


class VectorStore(FaissIdStore):
    """The FAISS :class:`~regionsearch.store.backend.VectorBackend`: a :class:`FaissIdStore`
    with filtered search, range search and its file (commit, refresh, open)."""

    # ------------------------------------------------------------------ lookups

    def __repr__(self) -> str:
        return (
            f"VectorStore(d={self.dimension}, factory={self.factory!r}, ntotal={self.ntotal}, "
            f"tombstones={self.n_tombstones}, trained={self.is_trained}, gpu={self.on_gpu})"
        )

    def stats(self) -> dict[str, Any]:
        return {
            "kind": "faiss",
            "path": None if self.path is None else str(self.path),
            "dimension": self.dimension,
            "factory": self.factory,
            "metric": METRIC,
            "ntotal": self.ntotal,
            "raw_ntotal": self.raw_ntotal,
            "tombstones": self.n_tombstones,
            "is_trained": self.is_trained,
            "train_size": self.train_size,
            "supports_remove": self.supports_remove,
            "read_only": self.read_only,
            "gpu": self.on_gpu,
        }

    def _lookupable(self) -> bool:
        """Can single stored vectors be read by position (``reconstruct``: exact filter path)?

        IVF indexes cannot without a direct map, which this store does not keep.
        """
        if self._can_reconstruct is None:
            if self._index.ntotal == 0:
                return False
            try:
                self._index.index.reconstruct(0)
                self._can_reconstruct = True
            except RuntimeError:
                self._can_reconstruct = False
        return self._can_reconstruct

    def reconstruct(self, ids: Any) -> np.ndarray:
        """Stored vectors of ``ids`` (decoded for compressed indexes). KeyError if one is absent."""
        ids = check_ids(ids)
        mask, pos = self._positions(ids)
        if self._tombstones:
            mask &= ~self._tombstoned(ids)
        if not mask.all():
            raise KeyError(f"ids not in the index: {ids[~mask][:5].tolist()}")
        try:
            return self._index.index.reconstruct_batch(pos)
        except RuntimeError as exc:
            raise VectorStoreError(f"{self.factory!r} cannot reconstruct vectors: {exc}") from exc

    # ------------------------------------------------------------------ search

    def _selector(self, selector: RegionFilter | None) -> FaissSelector | None:
        """External-id selector (filter AND NOT tombstones), or None when nothing filters."""
        tomb = self._tombstone_array() if self._tombstones else None
        if selector is not None:
            return region_selector(selector, max_id=self._max_id, exclude=tomb)
        if tomb is not None:
            return exclude_selector(tomb)
        return None

    def _search_params(self, selector: RegionFilter | None, keep: list[Any]) -> Any:
        sel = self._selector(selector)
        if sel is None:
            return None
        keep.append(sel)
        # Translate external ids -> internal positions ourselves: IndexIDMap only rewrites the
        # top-level parameters, not the nested ones of pre-transforms / refine wrappers.
        translated = faiss.IDSelectorTranslated(self._index.id_map, sel.selector)
        keep.append(translated)
        return layer_params(self._index.index, translated, keep)

    @staticmethod
    def _check_selector(selector: Any) -> RegionFilter | None:
        if selector is None or isinstance(selector, RegionFilter):
            return selector
        raise TypeError(
            f"selector must be a RegionFilter or None, got {type(selector).__name__} "
            "(wrap an id list with RegionFilter.from_ids)"
        )

    def _exact_subset(self, selector: RegionFilter) -> tuple[np.ndarray, np.ndarray] | None:
        """(ids, vectors) of the live allowed ids when the exact pre-filter path applies.

        Approximate graph/IVF indexes can miss allowed ids when the filter is tiny, so a
        filter of at most ``exact_filter_limit`` ids is scored exactly instead."""
        if self._exact or not self._lookupable():
            return None
        if allowed_upper_bound(selector) > self.exact_filter_limit:
            return None
        allowed = allowed_ids(selector)
        mask, pos = self._positions(allowed)
        ids = allowed[mask]
        if self._tombstones and ids.size:
            live = ~self._tombstoned(ids)
            ids, pos = ids[live], pos[live]
        if ids.size == 0:
            return ids, np.empty((0, self.dimension), dtype=np.float32)
        return ids, self._index.index.reconstruct_batch(pos)

    def search(
        self, queries: Any, k: int, selector: RegionFilter | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """k nearest by inner product: (scores float32 (nq, k), ids int64 (nq, k)).

        ``selector`` restricts the search to the ids it allows (inside FAISS: a pre-filter).
        Slots without a result hold id -1 and score -inf.
        """
        q = check_queries(queries, self.dimension)
        k = int(k)
        if k <= 0:
            raise ValueError("k must be positive")
        selector = self._check_selector(selector)
        nq = q.shape[0]
        if self.raw_ntotal == 0 or (selector is not None and selector.is_empty):
            return np.full((nq, k), -np.inf, np.float32), np.full((nq, k), -1, np.int64)
        if selector is not None:
            subset = self._exact_subset(selector)
            if subset is not None:
                ids, vecs = subset
                return topk(q @ vecs.T, ids, k)
        keep: list[Any] = []
        params = self._search_params(selector, keep)
        use_gpu = params is None and k <= GPU_MAX_K and not self._tombstones
        gpu = self._gpu.get(self._index, self.factory) if use_gpu else None
        if gpu is not None:
            scores, labels = gpu.search(q, k)
        else:
            scores, labels = self._index.search(q, k, params=params)
        scores = scores.astype(np.float32, copy=False)
        scores[labels < 0] = -np.inf
        return scores, labels

    def range_search(
        self, query: Any, threshold: float, selector: RegionFilter | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """All vectors with score >= ``threshold`` for one query: (scores, ids), best first."""
        q = check_queries(query, self.dimension)
        if q.shape[0] != 1:
            raise VectorValidationError("range_search takes one query; use range_search_batch")
        _lims, scores, ids = self.range_search_batch(q, threshold, selector)
        return scores, ids

    def range_search_batch(
        self, queries: Any, threshold: float, selector: RegionFilter | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """FAISS-style range search: (lims, scores, ids); query i owns ``[lims[i], lims[i+1])``.

        Each query's results are sorted best first and satisfy ``score >= threshold``.
        """
        q = check_queries(queries, self.dimension)
        nq = q.shape[0]
        selector = self._check_selector(selector)
        empty = (np.zeros(nq + 1, np.int64), np.empty(0, np.float32), np.empty(0, np.int64))
        if self.raw_ntotal == 0 or (selector is not None and selector.is_empty):
            return empty
        subset = self._exact_subset(selector) if selector is not None else None
        if subset is not None:
            sub_ids, vecs = subset
            sims = q @ vecs.T
            raw = []
            for row in sims:
                hit = np.flatnonzero(row >= threshold)
                raw.append((row[hit], sub_ids[hit]))
        else:
            keep: list[Any] = []
            params = self._search_params(selector, keep)
            # FAISS keeps IP results strictly above the radius: lower it by one ulp for ">=".
            radius = float(np.nextafter(np.float32(threshold), np.float32(-np.inf)))
            lims, scores, labels = self._index.range_search(q, radius, params=params)
            raw = [
                (scores[lims[i] : lims[i + 1]], labels[lims[i] : lims[i + 1]]) for i in range(nq)
            ]
        return ranked_ranges(raw, threshold)

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the index and its sidecars atomically (see :mod:`faiss_files`)."""
        path = Path(path)
        if self._tombstones and self._supports_remove and not self.read_only:
            self.compact()
        removed = np.fromiter(
            self._removed_since_save, dtype=np.int64, count=len(self._removed_since_save)
        )
        index = self._index
        if is_gpu_index(index):  # pragma: no cover - the master copy is always on the CPU
            index = faiss.index_gpu_to_cpu(index)
        faiss_files.write_store(
            path,
            index,
            np.union1d(self._tombstone_array(), removed),
            factory=self.factory,
            dimension=self.dimension,
            train_size=self.train_size,
        )
        self._removed_since_save.clear()
        if self.path is not None and path.resolve() == self.path.resolve():
            self._file_sig = faiss_files.file_signature(path)
            self._dirty = False

    # ------------------------------------------------------------------ VectorBackend

    def commit(self) -> None:
        """Save to the bound ``path`` (atomically) if anything changed since the last save."""
        self._check_writable()
        if self.path is None:
            raise VectorStoreError("this vector store is not bound to a file (pass path=)")
        if self._dirty or not self.path.exists():
            self.save(self.path)

    def refresh(self) -> bool:
        """Reader side: reload the bound file if a writer replaced it since. True if reloaded."""
        if not self.read_only or self.path is None:
            return False
        sig = faiss_files.file_signature(self.path)
        if sig is None or sig == self._file_sig:
            return False
        fresh = type(self).open(
            self.path, factory=self.factory, mmap=self._mmap, read_only=True, use_gpu=False
        )
        self._adopt(fresh)
        return True

    def _adopt(self, fresh: VectorStore) -> None:
        """Take over the index and tombstones of ``fresh`` (a newer load of the same file)."""
        self.train_size = fresh.train_size
        self._buffering = fresh._buffering
        self._tombstones = fresh._tombstones
        self._tomb_cache = None
        self._removed_since_save = set()
        self._set_index(fresh._index)
        self._file_sig = fresh._file_sig
        self._dirty = False
        self._gpu.drop()

    def close(self) -> None:
        """Drop the GPU replica (the CPU index goes with the object; idempotent)."""
        self._gpu.drop()

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        factory: str | None = None,
        mmap: bool = False,
        read_only: bool = False,
        use_gpu: bool | None = None,
        **options: Any,
    ) -> VectorStore:
        """Load a saved store bound to ``path`` (``commit`` saves there, ``refresh`` reloads).

        ``factory`` defaults to the one recorded next to the file; ``mmap`` maps it (and
        implies ``read_only``)."""
        path = Path(path)
        sig = faiss_files.file_signature(path)  # before reading: refresh sees a later write
        if sig is None:
            raise FileNotFoundError(f"no vector index at {path}")
        meta = faiss_files.read_meta(path)
        index = faiss_files.read_index(path, mmap)
        recorded = meta.get("factory")
        chosen = normalize_factory(factory) if factory else (recorded or None)
        if chosen is None:
            chosen = (
                DEFAULT_FACTORY
                if isinstance(faiss.downcast_index(getattr(index, "index", index)), faiss.IndexFlat)
                else None
            )
        if chosen is None:
            raise VectorStoreError(
                f"{path} has no metadata sidecar; pass factory= (the string it was built with)"
            )
        if recorded and factory and normalize_factory(factory) != recorded:
            raise VectorStoreError(
                f"{path} was built with factory {recorded!r}, not {normalize_factory(factory)!r}"
            )
        if "train_size" in meta and "train_size" not in options:
            options["train_size"] = meta["train_size"]
        store = cls(
            int(index.d),
            chosen,
            use_gpu=use_gpu,
            path=path,
            read_only=read_only,
            mmap=mmap,
            _index=index,
            **options,
        )
        store._file_sig = sig
        hidden = faiss_files.read_tombstones(path)
        if hidden is not None:
            mask, _ = store._positions(hidden)
            store._tombstones = set(hidden[mask].tolist())
        return store

    #: Files of a store (kept here for callers that only know the class).
    sidecar_paths = staticmethod(faiss_files.sidecar_paths)
    remove_files = staticmethod(faiss_files.remove_files)


__all__ = [
    "DEFAULT_FACTORY",
    "ReadOnlyError",
    "VectorStore",
    "VectorStoreError",
    "VectorValidationError",
    "brute_force_search",
    "default_train_size",
    "normalize_factory",
]
