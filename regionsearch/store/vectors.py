"""FAISS vector store keyed by region id (``IndexIDMap2``), inner product on normalised vectors.

``VectorStore`` wraps one FAISS index built from a factory string. The outermost layer is always
``IDMap2`` so that FAISS ids are the SQL region ids and vectors can be looked up by id
(``"IVF256,Flat"`` is stored as ``"IDMap2,IVF256,Flat"``). The default, ``"IDMap2,Flat"``, is
exact inner product: right up to about a million regions. Any factory string works
(``"IVF1024,Flat"``, ``"HNSW32"``, ``"IVF4096,PQ32"``, ``"OPQ32,IVF4096,PQ32,RFlat"``, ...).

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
    them inside FAISS with an ``IDSelectorNot`` at search time, persists them next to the index
    (``<path>.tombstones.npy``) and is rebuilt without them by :meth:`rebuild` (automatic once
    tombstones exceed ``rebuild_threshold`` of the stored vectors). IVF is in that group on
    purpose: ``IDMap2.remove_ids`` over IVF compacts the id table while IVF keeps its internal
    ids, which silently shifts every later id (seen with FAISS 1.15; see the regression test).
    Rebuilding reads the vectors back with ``reconstruct_n`` through the ``IDMap2`` layer: exact
    for Flat/HNSW-Flat/IVF-Flat storage, the decoded approximation for PQ/SQ codes (re-encoding
    adds a little loss; re-embed from the images to avoid it). A trained index keeps its
    quantiser and codebooks across a rebuild (``clone_index`` + ``reset``).

Filtered search
    ``search(..., selector_ids=...)`` runs inside FAISS with ``SearchParameters(sel=...)``
    (``IDSelectorBatch``, combined with the tombstone ``IDSelectorNot``), with the right parameter
    class for each layer (IVF nprobe, HNSW efSearch, pre-transforms, refine). The selector is
    translated to FAISS's internal positions here (``IDSelectorTranslated``), because ``IDMap2``
    only translates the top-level parameters. Approximate graph/IVF indexes can miss allowed ids
    when the allow-list is tiny, so for approximate indexes an allow-list of at most
    ``exact_filter_limit`` ids is scored exactly against the stored vectors instead (a pre-filter,
    not a post-filter: results are never cut below k by the filter).

Persistence
    :meth:`save` is atomic: each file is written to ``<file>.tmp``, fsynced, ``os.replace``-d over
    the old one and the directory fsynced, so a crash leaves the previous complete file. Order:
    tombstones, metadata (``<path>.meta.json``: factory, dimension, train size), index. A stale
    tombstone file only lists ids that are absent or really deleted; ids are never reused, so any
    crash mix is safe. ``open(path, mmap=True)`` memory-maps the file
    (``IO_FLAG_MMAP | IO_FLAG_MMAP_IFC``); a memory-mapped store is read-only.

GPU
    With ``use_gpu=None`` (auto) the store uses a GPU when ``faiss.get_num_gpus() > 0``. The CPU
    index stays the master copy (mutations, selectors, range search, k > 2048 and saving run on
    it); unfiltered k-NN searches run on a GPU replica (``index_cpu_to_gpu`` /
    ``index_cpu_to_all_gpus``) refreshed lazily after mutations. Factories the GPU cloner does not
    support fall back to CPU with a warning. A store built around a GPU index is brought back with
    ``index_gpu_to_cpu`` before writing. Untested here (no GPU in CI).

Not thread-safe for concurrent mutation and search; ``RegionIndex`` serialises access.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from .backend import ReadOnlyBackendError, RegionFilter
from .faiss_filters import (
    FaissSelector,
    allowed_ids,
    allowed_upper_bound,
    exclude_selector,
    region_selector,
)

log = logging.getLogger(__name__)

DEFAULT_FACTORY = "IDMap2,Flat"
METRIC = "ip"
META_FORMAT = 1
GPU_MAX_K = 2048


class VectorStoreError(RuntimeError):
    """Invalid use of a vector store or an unreadable index file."""


class ReadOnlyError(VectorStoreError, ReadOnlyBackendError):
    """Mutation of a store opened read-only (memory-mapped)."""


class VectorValidationError(ValueError):
    """Vectors or ids handed to ``add`` are not what the index stores."""


# ----------------------------------------------------------------------------- helpers


def normalize_factory(factory: str) -> str:
    """Canonical factory string: no spaces, ``IDMap2`` outermost (``IDMap`` is upgraded)."""
    f = re.sub(r"\s+", "", factory or "")
    if not f:
        return DEFAULT_FACTORY
    if f.startswith("IDMap2,"):
        return f
    if f.startswith("IDMap,"):
        return "IDMap2," + f[len("IDMap,") :]
    return "IDMap2," + f


def default_train_size(factory: str) -> int:
    """Training points wanted by ``factory`` (30 per centroid of the largest quantiser)."""
    f = normalize_factory(factory)
    centroids = 1
    for m in re.finditer(r"IVF(\d+)", f):
        centroids = max(centroids, int(m.group(1)))
    for m in re.finditer(r"PQ\d+(?:x(\d+))?", f):
        nbits = int(m.group(1)) if m.group(1) else 8
        centroids = max(centroids, 2**nbits)
    if centroids == 1:
        return 1000
    return 30 * centroids


def _atomic_write(path: Path, write: Any) -> None:
    """``write(tmp_path)``, fsync, ``os.replace`` onto ``path``, fsync the directory."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    if os.name != "posix":  # pragma: no cover
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _as_ids(ids: Any, name: str = "ids") -> np.ndarray:
    arr = np.asarray(ids)
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim != 1:
        raise VectorValidationError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise VectorValidationError(f"{name} must be integers, got {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.int64)


def _topk(scores: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k per row of ``scores`` (nq, m) -> (nq, k) padded with (-inf, -1)."""
    nq, m = scores.shape
    out_d = np.full((nq, k), -np.inf, dtype=np.float32)
    out_i = np.full((nq, k), -1, dtype=np.int64)
    if m == 0:
        return out_d, out_i
    kk = min(k, m)
    part = (
        np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
        if kk < m
        else np.tile(np.arange(m), (nq, 1))
    )
    part_scores = np.take_along_axis(scores, part, axis=1)
    order = np.argsort(-part_scores, axis=1, kind="stable")
    best = np.take_along_axis(part, order, axis=1)
    out_d[:, :kk] = np.take_along_axis(scores, best, axis=1)
    out_i[:, :kk] = ids[best]
    return out_d, out_i


def _file_signature(path: Path) -> tuple[int, int, int] | None:
    """(inode, mtime ns, size) of ``path``; None if absent. ``os.replace`` changes the inode."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _gpu_available() -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


# ----------------------------------------------------------------------------- store


class VectorStore:
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
        self._gpu_index: Any = None
        self._gpu_dirty = True
        self._gpu_res: Any = None
        if _index is None:
            self._buffering = not probe.is_trained
            self._set_index(self._new_buffer() if self._buffering else probe)
        else:
            index = _index
            if self._is_gpu_index(index):
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
        self._use_gpu = self._resolve_gpu(use_gpu)
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
        self._gpu_dirty = True
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
            hnsw = self._find(index, faiss.IndexHNSW)
            if hnsw is not None:
                hnsw.hnsw.efSearch = int(self.ef_search)

    @staticmethod
    def _find(index: Any, cls: type) -> Any:
        """First layer of ``index`` that is an instance of ``cls`` (or None)."""
        seen = 0
        while index is not None and seen < 8:
            index = faiss.downcast_index(index)
            if isinstance(index, cls):
                return index
            if isinstance(index, faiss.IndexIDMap | faiss.IndexPreTransform):
                index = index.index
            elif isinstance(index, faiss.IndexRefine):
                index = index.base_index
            else:
                return None
            seen += 1
        return None

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

    def _resolve_gpu(self, use_gpu: bool | None) -> bool:
        available = _gpu_available()
        if use_gpu is None:
            return available
        if use_gpu and not available:
            log.warning("use_gpu=True but FAISS sees no GPU (faiss-cpu build?): using the CPU")
            return False
        return bool(use_gpu)

    @staticmethod
    def _is_gpu_index(index: Any) -> bool:
        return hasattr(faiss, "GpuIndex") and isinstance(
            faiss.downcast_index(index), faiss.GpuIndex
        )

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
        return self._use_gpu

    @property
    def index(self) -> Any:
        """The underlying CPU FAISS index (read it; mutate through this class)."""
        return self._index

    def __len__(self) -> int:
        return self.ntotal

    def __contains__(self, region_id: object) -> bool:
        try:
            rid = int(region_id)  # type: ignore[call-overload]
        except (TypeError, ValueError):
            return False
        return bool(self.contains(np.array([rid], dtype=np.int64))[0])

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
        ids = _as_ids(ids)
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
        self._gpu_dirty = True

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

    def validate_vectors(self, vectors: Any, n: int | None = None) -> np.ndarray:
        """Shape (n, d) float32, finite, L2 norm 1 within ``norm_tolerance``; returns a C array."""
        arr = np.asarray(vectors)
        if arr.ndim == 1:
            arr = arr.reshape(1, -1)
        if arr.ndim != 2 or arr.shape[1] != self.dimension:
            raise VectorValidationError(
                f"vectors must have shape (N, {self.dimension}) for this index, got {arr.shape}"
            )
        if n is not None and arr.shape[0] != n:
            raise VectorValidationError(f"{arr.shape[0]} vectors for {n} ids")
        if arr.dtype != np.float32:
            raise VectorValidationError(
                f"vectors must be float32, got {arr.dtype} (convert with .astype(np.float32))"
            )
        if not np.isfinite(arr).all():
            raise VectorValidationError("vectors contain NaN or infinite values")
        if arr.shape[0]:
            norms = np.linalg.norm(arr.astype(np.float64), axis=1)
            bad = np.abs(norms - 1.0) > self.norm_tolerance
            if bad.any():
                i = int(np.argmax(bad))
                raise VectorValidationError(
                    f"{int(bad.sum())} vector(s) are not L2-normalised (e.g. row {i} has norm "
                    f"{norms[i]:.6f}); normalise before adding (inner product = cosine only for "
                    "unit vectors)"
                )
        return np.ascontiguousarray(arr)

    def _as_queries(self, queries: Any) -> np.ndarray:
        q = np.asarray(queries)
        if q.ndim == 1:
            q = q.reshape(1, -1)
        if q.ndim != 2 or q.shape[1] != self.dimension:
            raise VectorValidationError(
                f"queries must have shape (nq, {self.dimension}), got {np.asarray(queries).shape}"
            )
        if not np.issubdtype(q.dtype, np.floating):
            raise VectorValidationError(f"queries must be floating point, got {q.dtype}")
        q = np.ascontiguousarray(q, dtype=np.float32)
        if not np.isfinite(q).all():
            raise VectorValidationError("queries contain NaN or infinite values")
        return q

    # ------------------------------------------------------------------ mutation

    def add(self, ids: Any, vectors: Any, image_ids: Any = None) -> None:
        """Add ``vectors`` (float32 (N, d), unit norm) under ``ids`` (int64 (N,), new, >= 0).

        ``image_ids`` is accepted for the :class:`VectorBackend` contract and ignored: FAISS
        filters by id ranges, not by a stored image field."""
        self._check_writable()
        ids = _as_ids(ids)
        vectors = self.validate_vectors(vectors, n=ids.size)
        if ids.size == 0:
            return
        if (ids < 0).any():
            raise VectorValidationError("ids must be >= 0 (-1 is FAISS's 'no result')")
        order = np.argsort(ids, kind="stable")
        ids, vectors = ids[order], np.ascontiguousarray(vectors[order])
        if (ids[1:] == ids[:-1]).any():
            dup = ids[1:][ids[1:] == ids[:-1]][:5].tolist()
            raise VectorValidationError(f"duplicate ids in one add: {dup}")
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
        self._gpu_dirty = True
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
        ids = np.unique(_as_ids(ids))
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
            new.train(self._reconstruct_positions(old, sample))
            buffering = False
        if buffering:
            new = self._new_buffer()
        order = np.argsort(view, kind="stable")  # add in id order: keeps the id table sorted
        for start in range(0, n, chunk):
            pos = np.sort(order[start : start + chunk])
            pos = pos[keep_mask[pos]]
            if pos.size == 0:
                continue
            vecs = self._reconstruct_positions(old, pos)
            ids = view[pos]
            o = np.argsort(ids, kind="stable")
            new.add_with_ids(np.ascontiguousarray(vecs[o]), ids[o])
        self._buffering = buffering
        self._clear_tombstones()
        self._set_index(new)
        log.info(
            "rebuilt %s: %d live vectors, %d tombstones dropped", self.factory, live_n, tomb.size
        )

    @staticmethod
    def _reconstruct_positions(index: Any, positions: np.ndarray) -> np.ndarray:
        """Vectors at internal ``positions`` (contiguous runs via reconstruct_n)."""
        out = np.empty((positions.size, index.d), dtype=np.float32)
        if positions.size == 0:
            return out
        breaks = np.flatnonzero(np.diff(positions) != 1) + 1
        start = 0
        for run in np.split(positions, breaks):
            out[start : start + run.size] = index.index.reconstruct_n(int(run[0]), int(run.size))
            start += run.size
        return out

    def reconstruct(self, ids: Any) -> np.ndarray:
        """Stored vectors of ``ids`` (decoded for compressed indexes). KeyError if one is absent."""
        ids = _as_ids(ids)
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

    def _params(self, index: Any, sel: Any, keep: list[Any]) -> Any:
        """SearchParameters of the right class for every layer of ``index``, all with ``sel``."""
        index = faiss.downcast_index(index)
        if isinstance(index, faiss.IndexIDMap):
            return self._params(index.index, sel, keep)
        if isinstance(index, faiss.IndexPreTransform):
            p = faiss.SearchParametersPreTransform()
            p.index_params = self._params(index.index, sel, keep)
        elif isinstance(index, faiss.IndexRefine):
            p = faiss.IndexRefineSearchParameters()
            p.k_factor = index.k_factor
            p.base_index_params = self._params(index.base_index, sel, keep)
        elif isinstance(index, faiss.IndexIVF):
            p = faiss.SearchParametersIVF()
            p.nprobe = index.nprobe
            p.max_codes = index.max_codes
        elif isinstance(index, faiss.IndexHNSW):
            p = faiss.SearchParametersHNSW()
            p.efSearch = index.hnsw.efSearch
        else:
            p = faiss.SearchParameters()
        p.sel = sel
        keep.append(p)
        return p

    def _search_params(self, selector: RegionFilter | None, keep: list[Any]) -> Any:
        sel = self._selector(selector)
        if sel is None:
            return None
        keep.append(sel)
        # Translate external ids -> internal positions ourselves: IndexIDMap only rewrites the
        # top-level parameters, not the nested ones of pre-transforms / refine wrappers.
        translated = faiss.IDSelectorTranslated(self._index.id_map, sel.selector)
        keep.append(translated)
        return self._params(self._index.index, translated, keep)

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
        q = self._as_queries(queries)
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
                return _topk(q @ vecs.T, ids, k)
        keep: list[Any] = []
        params = self._search_params(selector, keep)
        gpu = self._gpu() if params is None and k <= GPU_MAX_K else None
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
        q = self._as_queries(query)
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
        q = self._as_queries(queries)
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
        parts_s, parts_i, out_lims = [], [], [0]
        for sc, lb in raw:
            ok = sc >= threshold
            sc, lb = sc[ok], lb[ok]
            order = np.argsort(-sc, kind="stable")
            parts_s.append(sc[order].astype(np.float32))
            parts_i.append(lb[order].astype(np.int64))
            out_lims.append(out_lims[-1] + sc.size)
        return (
            np.asarray(out_lims, dtype=np.int64),
            np.concatenate(parts_s) if parts_s else empty[1],
            np.concatenate(parts_i) if parts_i else empty[2],
        )

    # ------------------------------------------------------------------ GPU

    def _gpu(self) -> Any:
        if not self._use_gpu or self._tombstones:
            return None
        if self._gpu_index is not None and not self._gpu_dirty:
            return self._gpu_index
        try:  # pragma: no cover - needs a GPU build of FAISS
            if faiss.get_num_gpus() > 1:
                co = faiss.GpuMultipleClonerOptions()
                co.shard = False
                self._gpu_index = faiss.index_cpu_to_all_gpus(self._index, co)
            else:
                if self._gpu_res is None:
                    self._gpu_res = faiss.StandardGpuResources()
                self._gpu_index = faiss.index_cpu_to_gpu(self._gpu_res, 0, self._index)
            self._gpu_dirty = False
            return self._gpu_index
        except RuntimeError as exc:  # pragma: no cover
            log.warning(
                "FAISS cannot put %s on the GPU (%s): searching on the CPU", self.factory, exc
            )
            self._use_gpu = False
            self._gpu_index = None
            return None

    # ------------------------------------------------------------------ persistence

    @staticmethod
    def sidecar_paths(path: str | os.PathLike[str]) -> tuple[Path, Path]:
        """(metadata JSON, tombstones .npy) written next to an index file."""
        p = Path(path)
        return p.with_name(p.name + ".meta.json"), p.with_name(p.name + ".tombstones.npy")

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the index (and its sidecars) atomically; see the module docstring."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if self._tombstones and self._supports_remove and not self.read_only:
            self.compact()
        meta_path, tomb_path = self.sidecar_paths(path)
        hidden = np.union1d(
            self._tombstone_array(),
            np.fromiter(
                self._removed_since_save, dtype=np.int64, count=len(self._removed_since_save)
            ),
        )

        def write_tombstones(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.save(f, hidden.astype(np.int64))

        def write_meta(tmp: Path) -> None:
            meta = {
                "format": META_FORMAT,
                "factory": self.factory,
                "dimension": self.dimension,
                "metric": METRIC,
                "train_size": self.train_size,
            }
            tmp.write_text(json.dumps(meta, indent=2) + "\n")

        index = self._index
        if self._is_gpu_index(index):  # pragma: no cover - the master copy is always on the CPU
            index = faiss.index_gpu_to_cpu(index)

        def write_index(tmp: Path) -> None:
            faiss.write_index(index, str(tmp))

        if hidden.size:
            _atomic_write(tomb_path, write_tombstones)
        _atomic_write(meta_path, write_meta)
        _atomic_write(path, write_index)
        if not hidden.size and tomb_path.exists():
            tomb_path.unlink()
        self._removed_since_save.clear()
        if self.path is not None and path.resolve() == self.path.resolve():
            self._file_sig = _file_signature(path)
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
        sig = _file_signature(self.path)
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
        self._gpu_index = None

    def close(self) -> None:
        """Drop the GPU replica (the CPU index goes with the object; idempotent)."""
        self._gpu_index = None
        self._gpu_dirty = True

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
        sig = _file_signature(path)  # before reading: a later replacement is seen by refresh
        if sig is None:
            raise FileNotFoundError(f"no vector index at {path}")
        meta_path, tomb_path = cls.sidecar_paths(path)
        meta: dict[str, Any] = {}
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
        index = cls._read(path, mmap)
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
                f"{path} has no {meta_path.name}; pass factory= (the string it was built with)"
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
        if tomb_path.exists():
            with open(tomb_path, "rb") as f:
                hidden = _as_ids(np.load(f))
            mask, _ = store._positions(hidden)
            store._tombstones = set(hidden[mask].tolist())
        return store

    @staticmethod
    def _read(path: Path, mmap: bool) -> Any:
        if not mmap:
            try:
                return faiss.read_index(str(path))
            except RuntimeError as exc:
                raise VectorStoreError(f"cannot read FAISS index {path}: {exc}") from exc
        errors = []
        # IO_FLAG_MMAP_IFC maps flat code arrays (Flat, HNSW storage, PQ codes);
        # IO_FLAG_MMAP maps IVF inverted lists. Not every layout accepts both.
        for flags in (faiss.IO_FLAG_MMAP | faiss.IO_FLAG_MMAP_IFC, faiss.IO_FLAG_MMAP_IFC):
            try:
                return faiss.read_index(str(path), flags)
            except RuntimeError as exc:
                errors.append(str(exc).splitlines()[0])
        raise VectorStoreError(f"cannot memory-map FAISS index {path}: {errors}")

    @staticmethod
    def remove_files(path: str | os.PathLike[str]) -> None:
        """Delete an index file, its sidecars and any leftover ``.tmp`` files."""
        p = Path(path)
        for f in (p, *VectorStore.sidecar_paths(p)):
            for g in (f, f.with_name(f.name + ".tmp")):
                with contextlib.suppress(FileNotFoundError):
                    g.unlink()


def brute_force_search(
    vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k in numpy (the test oracle, also handy for small sets)."""
    return _topk(
        np.asarray(queries, np.float32) @ np.asarray(vectors, np.float32).T, _as_ids(ids), k
    )


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
