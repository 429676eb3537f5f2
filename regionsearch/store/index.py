"""``RegionIndex``: one index = SQL metadata + a vector backend, kept consistent.

Layout of ``indexes/<name>/`` (with the default FAISS backend)::

    regions.db                      SQLite database (default; any SQLAlchemy URL may be given)
    vectors.segments/               FAISS segments (store/segments.py); an index made before
                                    segments keeps its single vectors.faiss (store/backends.py)
    manifest.json                   human copy of the manifest (model, embedder, dimension, db URL)
    .lock                           writer lock (one writing process per index)

``RegionIndex`` is a facade: each job lives in its own module, and this class wires them
together and holds the index's lock.

- :mod:`~regionsearch.store.records` -- the records it takes and returns;
- :mod:`~regionsearch.store.lock` -- the writer lock of the directory;
- :mod:`~regionsearch.store.manifest` / :mod:`~regionsearch.store.manifest_rows` -- identity;
- :mod:`~regionsearch.store.index_reads` -- the read side: lookups, filters, search, stats;
- :mod:`~regionsearch.store.images` / :mod:`~regionsearch.store.regions` -- the SQL rows;
- :mod:`~regionsearch.store.region_filters` -- image filters as id ranges for the backend;
- :mod:`~regionsearch.store.consistency` -- the SQL/vector write order, checkpoints and
  crash reconciliation (read its docstring before changing a write path);
- :mod:`~regionsearch.store.backend` -- the only interface to the vectors
  (:func:`~regionsearch.store.backends.open_vector_backend` picks the engine).

Read-only opens (an API server next to a running indexer) skip reconciliation and never write;
``reload_if_changed()`` refreshes the backend to see the writer's checkpoints.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .backend import VectorBackend
from .consistency import VectorSync
from .db import Database
from .errors import ReadOnlyIndexError
from .index_reads import IndexReader
from .lock import release_writer_lock
from .manifest import (
    DESCRIPTION_KEY,
    ManifestInfo,
    normalize_description,
    read_manifest_json,
    write_manifest_json,
)
from .manifest_rows import update_manifest
from .models import ImageStatus
from .opening import DB_FILE, locate_vectors, open_sql, open_vectors
from .records import (
    ImageRecord,
    NewRegion,
    ReconcileReport,
)

log = logging.getLogger(__name__)


class RegionIndex(IndexReader):
    """One region index: images and regions in SQL, their vectors in a :class:`VectorBackend`.

    Open with :meth:`open` / :meth:`create`; use as a context manager (``close`` checkpoints).
    Reads (lookups, filters, search, stats) come from :class:`IndexReader`; this class adds
    opening, writes, checkpoints and reconciliation.
    """

    def __init__(
        self,
        directory: Path,
        db: Database,
        manifest: ManifestInfo,
        vectors: VectorBackend,
        *,
        read_only: bool,
        lock_fd: int | None,
        checkpoint_every_s: float | None,
        checkpoint_every_vectors: int | None,
        vectors_location: str,
    ) -> None:
        self.directory = directory
        self.read_only = read_only
        self.vectors_location = vectors_location
        self._lock_fd = lock_fd
        self.checkpoint_every_s = checkpoint_every_s
        self.checkpoint_every_vectors = checkpoint_every_vectors
        lock = threading.RLock()
        super().__init__(db, manifest, VectorSync(db, vectors, manifest, lock), lock)
        self._closed = False
        self.last_reconcile: ReconcileReport | None = None

    # ------------------------------------------------------------------ opening

    @classmethod
    def create(
        cls,
        directory: str | os.PathLike[str],
        *,
        model: str,
        embedder: str,
        dimension: int,
        factory: str | None = None,
        **kwargs: Any,
    ) -> RegionIndex:
        """Open the index at ``directory``, creating it if absent (checked against the manifest)."""
        return cls.open(
            directory,
            model=model,
            embedder=embedder,
            dimension=dimension,
            factory=factory,
            create=True,
            **kwargs,
        )

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike[str],
        *,
        model: str | None = None,
        embedder: str | None = None,
        dimension: int | None = None,
        factory: str | None = None,
        db_url: str | None = None,
        create: bool = False,
        read_only: bool = False,
        mmap: bool = False,
        use_gpu: bool | None = None,
        image_root: str | None = None,
        checkpoint_every_s: float | None = 300.0,
        checkpoint_every_vectors: int | None = 50_000,
        vector_options: dict[str, Any] | None = None,
        vectors_location: str | None = None,
    ) -> RegionIndex:
        """Open (or with ``create=True`` create) the index stored in ``directory``.

        ``model``/``embedder``/``dimension``/``factory`` given for an existing index must match
        its manifest (:class:`IndexMismatchError` otherwise); ``None`` accepts what it holds.
        ``db_url``: any SQLAlchemy URL; default ``sqlite:///<directory>/regions.db``.
        ``read_only``: no lock, no reconciliation, no writes (``mmap=True`` requires it).
        ``vectors_location``: where the vectors live (a Milvus URL, ...), recorded in the
        manifest when the index is created; default: the backend file in ``directory``.
        A writable open takes the directory's writer lock and reconciles SQL with the vectors.
        """
        directory = Path(directory).expanduser().resolve()
        db, manifest, lock_fd = open_sql(
            directory,
            model=model,
            embedder=embedder,
            dimension=dimension,
            factory=factory,
            db_url=db_url,
            create=create,
            read_only=read_only,
            mmap=mmap,
            image_root=image_root,
        )
        try:
            location = locate_vectors(db, directory, manifest, vectors_location, read_only)
            options = {**(vector_options or {}), **({"mmap": True} if mmap else {})}
            vectors = open_vectors(
                location, manifest, read_only=read_only, use_gpu=use_gpu, **options
            )
        except BaseException:
            db.dispose()
            release_writer_lock(lock_fd)
            raise
        index = cls(
            directory,
            db,
            manifest,
            vectors,
            read_only=read_only,
            lock_fd=lock_fd,
            checkpoint_every_s=checkpoint_every_s,
            checkpoint_every_vectors=checkpoint_every_vectors,
            vectors_location=location,
        )
        if not read_only:
            try:
                index.reconcile()
                index._write_manifest_json()
            except BaseException:
                index._abandon()
                raise
        return index

    @staticmethod
    def exists(directory: str | os.PathLike[str]) -> bool:
        """Whether ``directory`` holds an index (its SQLite database or manifest.json)."""
        d = Path(directory)
        return (d / DB_FILE).exists() or (d / "manifest.json").exists()

    @staticmethod
    def read_manifest(directory: str | os.PathLike[str]) -> ManifestInfo | None:
        """The manifest copy of ``directory`` (cheap: no database, no vectors); None if absent."""
        return read_manifest_json(directory)

    def __enter__(self) -> RegionIndex:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"RegionIndex({self.name!r}, model={self.model!r}, embedder={self.embedder!r}, "
            f"d={self.dimension}, vectors={self.vectors.ntotal}, read_only={self.read_only})"
        )

    def _writable(self) -> None:
        if self._closed:
            raise RuntimeError(f"index {self.name!r} is closed")
        if self.read_only:
            raise ReadOnlyIndexError(f"index {self.name!r} was opened read-only")

    # ------------------------------------------------------------------ images

    def upsert_image(
        self,
        path: str,
        *,
        content_hash: str | None = None,
        size_bytes: int | None = None,
        mtime: float | None = None,
        width: int | None = None,
        height: int | None = None,
    ) -> ImageRecord:
        """Insert or update one image row (see :meth:`upsert_images`)."""
        item = {
            "path": path,
            "content_hash": content_hash,
            "size_bytes": size_bytes,
            "mtime": mtime,
            "width": width,
            "height": height,
        }
        return self.upsert_images([item])[0]

    def upsert_images(self, items: Iterable[dict[str, Any]]) -> list[ImageRecord]:
        """Insert or update image rows (see :meth:`ImageRepository.upsert`)."""
        self._writable()
        return self._images.upsert(items)

    def pending_images(self, limit: int | None = None) -> list[ImageRecord]:
        """Images to (re)process: status 'pending', minus those staged since the last checkpoint."""
        out: list[ImageRecord] = []
        for rec in self._images.iter(ImageStatus.PENDING):
            if rec.id in self._sync.unflushed_images:
                continue
            out.append(rec)
            if limit is not None and len(out) >= limit:
                break
        return out

    def mark_image_failed(self, image_id: int, error: str, *, drop_regions: bool = True) -> None:
        """Status 'failed' with ``error``; by default its (stale) regions are deleted too."""
        self._writable()
        with self._lock:
            if drop_regions:
                self._sync.delete_regions_of([int(image_id)])
            self._images.set_status([int(image_id)], ImageStatus.FAILED, error)
            self._sync.forget_images([int(image_id)])

    def delete_image(self, image_id: int) -> int:
        """The file is gone: tombstone its regions, status 'deleted'. Returns regions removed."""
        return self.delete_images([image_id])

    def delete_images(self, image_ids: Iterable[int]) -> int:
        self._writable()
        ids = [int(i) for i in image_ids]
        with self._lock:
            n = self._sync.delete_regions_of(ids)
            self._images.set_status(ids, ImageStatus.DELETED)
            self._sync.forget_images(ids)
            return n

    def delete_image_regions(self, image_id: int) -> int:
        """Tombstone all live regions of an image and remove their vectors; returns the count."""
        self._writable()
        return self._sync.delete_regions_of([int(image_id)])

    def record_embedder_description(self, described: dict[str, Any]) -> None:
        """Record the embedder's ``describe()`` in the manifest (see ``store.manifest``)."""
        self._writable()
        value = normalize_description(described)
        with self._lock:
            extra = {**self._manifest.extra, DESCRIPTION_KEY: value}  # new dict: JSON change
            update_manifest(self.db, self._manifest, extra=extra)
        self._write_manifest_json()

    def set_image_root(self, image_root: str | None) -> None:
        """Record the photo root that relative ``Image.path`` values refer to."""
        self._writable()
        update_manifest(self.db, self._manifest, image_root=image_root)
        self._write_manifest_json()

    # ------------------------------------------------------------------ regions

    def add_image_regions(
        self,
        image_id: int,
        regions: Sequence[NewRegion],
        vectors: np.ndarray,
        *,
        replace: bool = True,
    ) -> np.ndarray:
        """Store an image's regions and their vectors as one unit; returns the new region ids.

        ``vectors[i]`` (float32, unit norm, the index dimension) belongs to ``regions[i]``.
        With ``replace`` (default) the image's previous regions are deleted first, so calling
        this again for a re-processed image is safe. The vectors become durable, and the image
        'indexed', at the next :meth:`checkpoint` (automatic every ``checkpoint_every_*``).
        """
        return self.add_images_regions([(image_id, regions, vectors)], replace=replace)[0]

    def add_images_regions(
        self,
        items: Sequence[tuple[int, Sequence[NewRegion], np.ndarray]],
        *,
        replace: bool = True,
    ) -> list[np.ndarray]:
        """Batch of :meth:`add_image_regions`: one SQL transaction and one vector add."""
        self._writable()
        prepared = []
        for image_id, regions, vecs in items:
            checked = [r.validated() for r in regions]
            vecs = np.asarray(vecs)
            if vecs.size == 0 and not checked:
                vecs = np.empty((0, self.dimension), dtype=np.float32)
            vecs = self.vectors.validate_vectors(vecs, n=len(checked))
            prepared.append((int(image_id), checked, vecs))
        image_ids = [p[0] for p in prepared]
        if len(set(image_ids)) != len(image_ids):
            raise ValueError("an image appears twice in one add_images_regions batch")
        with self._lock:
            ids = self._sync.add_images_regions(prepared, replace)
            self._maybe_checkpoint()
            return ids

    def restore_vectors(self, region_ids: Any, vectors: np.ndarray) -> None:
        """Give 'missing' regions (found by reconciliation) their re-computed vectors."""
        self._writable()
        ids = np.asarray(region_ids, dtype=np.int64)
        vecs = self.vectors.validate_vectors(vectors, n=ids.size)
        if ids.size == 0:
            return
        with self._lock:
            self._sync.restore_vectors(ids, vecs)
            self._maybe_checkpoint()

    # ------------------------------------------------------------------ checkpoint / close

    def _maybe_checkpoint(self) -> None:
        if self._sync.due(self.checkpoint_every_s, self.checkpoint_every_vectors):
            self.checkpoint()

    def checkpoint(self) -> None:
        """Make everything added/removed so far durable (C1 vectors, then C2 SQL)."""
        if self.read_only or self._closed:
            return
        with self._lock:
            self._sync.commit_vectors()  # C1
            if self._sync.sql_behind:
                self._commit_flushed()  # C2
            self._sync.checkpointed()
            self._write_manifest_json()

    def _commit_flushed(self) -> None:
        """C2 (a method of its own: the crash tests kill the process right here)."""
        self._sync.commit_rows()

    def _write_manifest_json(self) -> None:
        try:
            write_manifest_json(self.directory, self._manifest)
        except OSError:  # pragma: no cover - the JSON copy is informational
            log.warning("could not write %s", self.directory / "manifest.json", exc_info=True)

    def close(self) -> None:
        """Checkpoint (writers), release the writer lock, the vectors and the database."""
        if self._closed:
            return
        try:
            if not self.read_only:
                self.checkpoint()
        finally:
            self._abandon()

    def _abandon(self) -> None:
        """Release resources without checkpointing (what a crash leaves behind, minus the lock)."""
        self._closed = True
        self.vectors.close()
        self.db.dispose()
        release_writer_lock(self._lock_fd)
        self._lock_fd = None

    # ------------------------------------------------------------------ reconcile / reload

    def reconcile(self) -> ReconcileReport:
        """Repair SQL/vector disagreements left by a crash (see ``store/consistency.py``)."""
        self._writable()
        report = self._sync.reconcile()
        if not report.clean:
            log.warning("index %r reconciled after an interrupted run: %s", self.name, report)
        self.last_reconcile = report
        return report

    def reload_if_changed(self) -> bool:
        """Read-only indexes: pick up a writer's checkpoints (``refresh``). True if any."""
        if not self.read_only:
            return False
        with self._lock:
            return self.vectors.refresh()
