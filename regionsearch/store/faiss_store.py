"""The in-memory FAISS store of vectors keyed by region id: ids, tombstones, training, rebuilds.

:class:`FaissIdStore` keeps one FAISS index whose outermost layer is ``IDMap2``, so FAISS ids
are the SQL region ids and vectors can be looked up by id (``"IVF256,Flat"`` is stored as
``"IDMap2,IVF256,Flat"``). :class:`~regionsearch.store.vectors.VectorStore` adds search and
files on top of it.

Training policy (factories whose index needs training: IVF, PQ, OPQ, SQ, ...)
    Until the index is trained, added vectors go to an exact ``IDMap2,Flat`` *buffer*, which is
    searched, filtered, removed from and saved like the real index (so results are exact and
    nothing is lost across restarts). As soon as the buffer holds ``train_size`` vectors the target
    index is trained on all of them and they move into it. ``train_size`` defaults to
    ``30 * max(nlist, 2**nbits if PQ)`` (30 points per centroid, FAISS's lower bound; FAISS warns
    below 39) and 1000 for other trainable factories; pass ``train_size=`` to change it or call
    :meth:`VectorStore.train` to train early (needs at least as many points as centroids).

Removal
    :meth:`VectorStore.remove` tombstones ids at once (they vanish from every search, range search
    and :meth:`ids`). Over flat-code storage (Flat, PQ, SQ, optionally behind a pre-transform)
    the tombstoned vectors are then dropped physically by one batched ``remove_ids`` (every
    ``compact_every`` removals, on :meth:`compact` and before every :meth:`save`):
    ``IndexIDMap2.remove_ids`` rebuilds its whole reverse map, so per-call removal would cost
    O(N) each time. Everything else (HNSW, IVF, refine wrappers) keeps the tombstones, filters
    them inside FAISS at search time, persists them next to the index and is rebuilt without
    them by :meth:`rebuild` (automatic once tombstones exceed ``rebuild_threshold`` of the
    stored vectors). IVF is in that group on purpose: ``IDMap2.remove_ids`` over IVF compacts
    the id table while IVF keeps its internal ids, which silently shifts every later id (seen
    with FAISS 1.15; see the regression test). Rebuilding reads the vectors back with
    ``reconstruct_n``: exact for Flat/HNSW-Flat/IVF-Flat storage, the decoded approximation for
    PQ/SQ codes. A trained index keeps its quantiser and codebooks across a rebuild.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from .faiss_gpu import GpuReplica, is_gpu_index, resolve_use_gpu
from .faiss_util import (
    DEFAULT_FACTORY,
    METRIC,
    ReadOnlyError,
    VectorStoreError,
    default_train_size,
    find_layer,
    normalize_factory,
    reconstruct_positions,
)
from .vector_checks import ValidatingBackend, VectorValidationError, check_ids, check_new_ids

log = logging.getLogger(__name__)


class FaissIdStore(ValidatingBackend):
    """A FAISS index of L2-normalised float32 vectors keyed by int64 ids (inner product).

    ``ntotal`` counts live vectors (tombstoned ones excluded). See the module docstring for the
    training and removal policies.
    """

    """A FAISS index of L2-normalised float32 vectors keyed by int64 ids (inner product).

    ``ntotal`` counts live vectors (tombstoned ones excluded). See the module docstring for the
    training, removal, filtering, persistence and GPU policies.
    """

    def __init__(
        self,
        dimension: int,
        factory: str = DEFAULT_FACTORY,
        *,
        train_size: int | None = None,
        use_gpu: bool | None = None,
        norm_tolerance: float = 1e-2,
        rebuild_threshold: float = 0.1,
        compact_every: int = 4096,
        exact_filter_limit: int = 2048,
        nprobe: int | None = None,
        ef_search: int | None = None,
        path: str | os.PathLike[str] | None = None,
        read_only: bool = False,
        mmap: bool = False,
        _index: Any = None,
    ) -> None:
        if int(dimension) <= 0:
            raise ValueError(f"dimension must be positive, got {dimension}")
        self.dimension = int(dimension)
        self.factory = normalize_factory(factory)
        self.nprobe = nprobe
        self.ef_search = ef_search
        probe = self._new_target()  # validates the factory string early
        self.train_size = int(train_size) if train_size else default_train_size(self.factory)
        self.norm_tolerance = float(norm_tolerance)
        self.rebuild_threshold = float(rebuild_threshold)
        self.compact_every = int(compact_every)
        self.exact_filter_limit = int(exact_filter_limit)
        self.read_only = bool(read_only or mmap)
        self.path = None if path is None else Path(path)
        self._mmap = bool(mmap)  # a refresh maps the new file too
        self._file_sig: tuple[int, int, int] | None = None  # of ``path`` when last read/written
        self._dirty = False  # changed since the last save
        self._tombstones: set[int] = set()
        self._tomb_cache: np.ndarray | None = None
        self._removed_since_save: set[int] = set()
        self._order_cache: tuple[np.ndarray, np.ndarray] | None = None
        self._gpu = GpuReplica(False)
        if _index is None:
            self._buffering = not probe.is_trained
            self._set_index(self._new_buffer() if self._buffering else probe)
        else:
            index = _index
            if is_gpu_index(index):
                index = faiss.index_gpu_to_cpu(index)
            # (no downcast here: downcast wrappers do not own the C++ object; index_factory and
            # read_index already return the concrete, owning class)
            if not isinstance(index, faiss.IndexIDMap2):
                raise VectorStoreError(
                    f"expected an IndexIDMap2, got {type(index).__name__} "
                    "(vectors must be addressable by region id)"
                )
            if index.d != self.dimension:
                raise VectorStoreError(
                    f"index dimension {index.d} != expected dimension {self.dimension}"
                )
            loaded = type(faiss.downcast_index(index.index))
            target = type(faiss.downcast_index(probe.index))
            self._buffering = (not probe.is_trained) and loaded is not target
            if self._buffering and not issubclass(loaded, faiss.IndexFlat):
                raise VectorStoreError(
                    f"index file holds {loaded.__name__}, but factory {self.factory!r} builds "
                    f"{target.__name__}: open it with the factory it was created with"
                )
            self._set_index(index)
        self._gpu = GpuReplica(resolve_use_gpu(use_gpu))
        self._dirty = False

    # ------------------------------------------------------------------ construction

    def _new_target(self) -> Any:
        try:
            index = faiss.index_factory(self.dimension, self.factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as exc:
            raise ValueError(f"invalid FAISS factory string {self.factory!r}: {exc}") from exc
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None and getattr(self, "nprobe", None) is None:
            # FAISS defaults to nprobe=1 (poor recall, worse with text queries); a fresh index
            # gets nlist/32 clamped to [8, nlist]. Saved indexes keep the nprobe they were saved
            # with; pass nprobe= to override.
            ivf.nprobe = int(min(ivf.nlist, max(8, ivf.nlist // 32)))
        if not isinstance(index, faiss.IndexIDMap2):  # pragma: no cover - normalize_factory
            raise ValueError(f"factory {self.factory!r} does not build an IndexIDMap2")
        return index

    def _needs_training(self) -> bool:
        return not self._new_target().is_trained

    def _new_buffer(self) -> Any:
        return faiss.index_factory(self.dimension, DEFAULT_FACTORY, faiss.METRIC_INNER_PRODUCT)

    def _set_index(self, index: Any) -> None:
        self._index = index
        self._dirty = True
        self._configure(index)
        self._order_cache = None
        self._can_reconstruct: bool | None = None
        self._can_reconstruct_n: bool | None = None
        self._gpu.stale()
        view = self._id_view()
        self._ids_sorted = bool(view.size < 2 or np.all(view[1:] > view[:-1]))
        self._max_id = int(view.max()) if view.size else -1
        inner = faiss.downcast_index(index.index)
        self._exact = isinstance(inner, faiss.IndexFlat)
        self._supports_remove = self._probe_remove()

    def _configure(self, index: Any) -> None:
        ps = faiss.ParameterSpace()
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None and self.nprobe is not None:
            ps.set_index_parameter(index, "nprobe", int(self.nprobe))

        if self.ef_search is not None:
            hnsw = find_layer(index, faiss.IndexHNSW)
            if hnsw is not None:
                hnsw.hnsw.efSearch = int(self.ef_search)

    def _probe_remove(self) -> bool:
        """Can ``IDMap2.remove_ids`` be used? Only over flat-code storage (Flat, PQ, SQ...).

        ``IndexIDMap2.remove_ids`` compacts its id table assuming the sub-index renumbers the
        remaining vectors, which only ``IndexFlatCodes`` does. IVF keeps its internal ids, so
        removal through the id map would silently shift every later id (FAISS 1.15); IVF, HNSW
        and refine wrappers therefore use tombstones + rebuild.
        """
        inner = faiss.downcast_index(self._index.index)
        while isinstance(inner, faiss.IndexPreTransform):
            inner = faiss.downcast_index(inner.index)
        return isinstance(inner, faiss.IndexFlatCodes)

    # ------------------------------------------------------------------ properties

    @property
    def metric(self) -> str:
        return METRIC

    @property
    def is_trained(self) -> bool:
        """False while vectors still wait in the exact buffer for training."""
        return not self._buffering

    @property
    def supports_remove(self) -> bool:
        """Whether the current index can drop vectors physically (else: tombstones + rebuild)."""
        return self._supports_remove

    @property
    def raw_ntotal(self) -> int:
        """Vectors physically in the index, tombstoned ones included."""
        return int(self._index.ntotal)

    @property
    def ntotal(self) -> int:
        """Live (searchable) vectors."""
        return self.raw_ntotal - len(self._tombstones)

    @property
    def n_tombstones(self) -> int:
        return len(self._tombstones)

    @property
    def on_gpu(self) -> bool:
        return self._gpu.enabled

    @property
    def index(self) -> Any:
        """The underlying CPU FAISS index (read it; mutate through this class)."""
        return self._index

    # ------------------------------------------------------------------ ids

    def _id_view(self) -> np.ndarray:
        """Zero-copy view of the IDMap2 id table (internal position -> id). Use immediately."""
        n = self._index.id_map.size()
        if n == 0:
            return np.empty(0, dtype=np.int64)
        return faiss.rev_swig_ptr(self._index.id_map.data(), n)

    def _positions(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(present mask, internal positions of the present ids) for ``ids``."""
        view = self._id_view()
        if view.size == 0 or ids.size == 0:
            return np.zeros(ids.shape, dtype=bool), np.empty(0, dtype=np.int64)
        if self._ids_sorted:
            pos = np.searchsorted(view, ids)
            pos_c = np.minimum(pos, view.size - 1)
            mask = (pos < view.size) & (view[pos_c] == ids)
            return mask, pos_c[mask].astype(np.int64)
        if self._order_cache is None or self._order_cache[0].size != view.size:
            order = np.argsort(view, kind="stable")
            self._order_cache = (order, view[order])
        order, sorted_view = self._order_cache
        pos = np.searchsorted(sorted_view, ids)
        pos_c = np.minimum(pos, view.size - 1)
        mask = (pos < view.size) & (sorted_view[pos_c] == ids)
        return mask, order[pos_c[mask]].astype(np.int64)

    def contains(self, ids: Any) -> np.ndarray:
        """Boolean mask: which of ``ids`` are live in the store."""
        ids = check_ids(ids)
        mask, _ = self._positions(ids)
        if self._tombstones and mask.any():
            mask &= ~self._tombstoned(ids)
        return mask

    def _tombstoned(self, ids: np.ndarray) -> np.ndarray:
        if not self._tombstones:
            return np.zeros(ids.shape, dtype=bool)
        if ids.size <= 4096:
            tomb = self._tombstones
            return np.fromiter((i in tomb for i in ids.tolist()), dtype=bool, count=ids.size)
        return np.isin(ids, self._tombstone_array())

    def _add_tombstones(self, ids: list[int]) -> None:
        self._dirty = True
        self._tombstones.update(ids)
        self._removed_since_save.update(ids)
        self._tomb_cache = None
        self._gpu.stale()

    def _clear_tombstones(self) -> None:
        self._tombstones.clear()
        self._tomb_cache = None

    def ids(self) -> np.ndarray:
        """All live ids, sorted ascending (int64)."""
        view = self._id_view()
        if self._tombstones:
            return np.setdiff1d(view, self._tombstone_array(), assume_unique=True)
        return np.sort(view)

    def tombstones(self) -> np.ndarray:
        """Ids hidden by a tombstone and not yet physically removed (sorted)."""
        return self._tombstone_array()

    def _tombstone_array(self) -> np.ndarray:
        if not self._tombstones:
            return np.empty(0, dtype=np.int64)
        if self._tomb_cache is None:
            self._tomb_cache = np.sort(
                np.fromiter(self._tombstones, dtype=np.int64, count=len(self._tombstones))
            )
        return self._tomb_cache

    # ------------------------------------------------------------------ validation

    def _check_writable(self) -> None:
        if self.read_only:
            raise ReadOnlyError(
                "this vector store was opened read-only (a reader, or memory-mapped); open it "
                "writable (read_only=False, mmap=False) to modify it"
            )

    # ------------------------------------------------------------------ mutation

    def add(self, ids: Any, vectors: Any, image_ids: Any = None) -> None:
        """Add ``vectors`` (float32 (N, d), unit norm) under ``ids`` (int64 (N,), new, >= 0).

        ``image_ids`` is accepted for the :class:`VectorBackend` contract and ignored: FAISS
        filters by id ranges, not by a stored image field."""
        self._check_writable()
        ids = check_new_ids(ids)
        vectors = self.validate_vectors(vectors, n=ids.size)
        if ids.size == 0:
            return
        order = np.argsort(ids, kind="stable")
        ids, vectors = ids[order], np.ascontiguousarray(vectors[order])
        if ids[0] <= self._max_id:
            present, _ = self._positions(ids)
            if present.any():
                clash = ids[present][:5].tolist()
                hidden = [i for i in clash if i in self._tombstones]
                hint = " (removed ids cannot be re-added; ids are never reused)" if hidden else ""
                raise VectorValidationError(f"ids already in the index: {clash}{hint}")
            self._ids_sorted = False
        self._index.add_with_ids(vectors, ids)
        self._dirty = True
        self._max_id = max(self._max_id, int(ids[-1]))
        self._order_cache = None
        self._gpu.stale()
        if self._buffering and self._index.ntotal >= self.train_size:
            self.train()

    def train(self) -> None:
        """Train the target index on the buffered vectors now and move them into it."""
        self._check_writable()
        if not self._buffering:
            return
        buffer = self._index
        n = int(buffer.ntotal)
        target = self._new_target()
        if n == 0:
            raise VectorStoreError("no vectors to train on")
        vectors = buffer.index.reconstruct_n(0, n)
        ids = self._id_view().copy()
        try:
            target.train(vectors)
        except RuntimeError as exc:
            raise VectorStoreError(
                f"training {self.factory!r} on {n} vectors failed ({exc}); add more vectors "
                f"(the policy waits for {self.train_size})"
            ) from exc
        if self._tombstones:  # buffer tombstones are compacted away by the move
            keep = ~np.isin(ids, self._tombstone_array())
            ids, vectors = ids[keep], vectors[keep]
            self._clear_tombstones()
        order = np.argsort(ids, kind="stable")
        target.add_with_ids(np.ascontiguousarray(vectors[order]), ids[order])
        self._buffering = False
        self._set_index(target)
        log.info("trained %s on %d vectors", self.factory, n)

    def remove(self, ids: Any) -> int:
        """Remove ``ids`` (absent ones are ignored); returns how many live vectors went away."""
        self._check_writable()
        ids = np.unique(check_ids(ids))
        if ids.size == 0:
            return 0
        live = self.contains(ids)
        gone = ids[live]
        if gone.size == 0:
            return 0
        self._add_tombstones(gone.tolist())
        if self._supports_remove:
            if len(self._tombstones) >= self.compact_every:
                self.compact()
        elif (
            len(self._tombstones) > self.rebuild_threshold * max(self.raw_ntotal, 1)
            and self._reconstructable()
        ):
            self.rebuild()
        return int(gone.size)

    def compact(self) -> int:
        """Physically drop tombstoned vectors (``remove_ids`` or, if unsupported, rebuild)."""
        self._check_writable()
        if not self._tombstones:
            return 0
        n = len(self._tombstones)
        if self._supports_remove:
            removed = self._index.remove_ids(faiss.IDSelectorBatch(self._tombstone_array()))
            if removed != n:  # pragma: no cover - tombstones are always present ids
                log.warning("remove_ids removed %d of %d tombstoned ids", removed, n)
            self._clear_tombstones()
            self._set_index(self._index)
        else:
            self.rebuild()
        return n

    def _reconstructable(self) -> bool:
        """Can the stored vectors be read back in bulk (``reconstruct_n``: rebuild)?"""
        if self._can_reconstruct_n is None:
            if self._index.ntotal == 0:
                return True
            try:
                self._index.index.reconstruct_n(0, 1)
                self._can_reconstruct_n = True
            except RuntimeError:
                self._can_reconstruct_n = False
        return self._can_reconstruct_n

    def rebuild(self, chunk: int = 65536) -> None:
        """Rebuild the index from its own stored vectors without the tombstoned ones."""
        self._check_writable()
        old = self._index
        n = int(old.ntotal)
        tomb = self._tombstone_array()
        if n and not self._reconstructable():
            raise VectorStoreError(
                f"{self.factory!r} cannot reconstruct its vectors, so it cannot be rebuilt "
                "in place; re-add the vectors from their source into a new store"
            )
        view = self._id_view().copy()
        keep_mask = ~np.isin(view, tomb) if tomb.size else np.ones(n, dtype=bool)
        live_n = int(keep_mask.sum())
        if not self._buffering and self._needs_training():
            # Keep the trained quantiser / codebooks: clone and empty the current index.
            new = faiss.clone_index(old)
            new.reset()
        else:
            new = self._new_target()
        buffering = not new.is_trained
        if buffering and live_n >= self.train_size:
            rng = np.random.default_rng(0)
            live_pos = np.flatnonzero(keep_mask)
            sample = np.sort(rng.choice(live_pos, size=min(live_n, self.train_size), replace=False))
            new.train(reconstruct_positions(old, sample))
            buffering = False
        if buffering:
            new = self._new_buffer()
        order = np.argsort(view, kind="stable")  # add in id order: keeps the id table sorted
        for start in range(0, n, chunk):
            pos = np.sort(order[start : start + chunk])
            pos = pos[keep_mask[pos]]
            if pos.size == 0:
                continue
            vecs = reconstruct_positions(old, pos)
            ids = view[pos]
            o = np.argsort(ids, kind="stable")
            new.add_with_ids(np.ascontiguousarray(vecs[o]), ids[o])
        self._buffering = buffering
        self._clear_tombstones()
        self._set_index(new)
        log.info(
            "rebuilt %s: %d live vectors, %d tombstones dropped", self.factory, live_n, tomb.size
        )
