"""``RegionIndex``: one index directory = SQL metadata + FAISS vectors, kept consistent.

Layout of ``indexes/<name>/``::

    regions.db                      SQLite database (default; any SQLAlchemy URL may be given)
    vectors.faiss                   FAISS index, ids = region ids (+ .meta.json, .tombstones.npy)
    manifest.json                   human copy of the manifest (model, embedder, dimension, db URL)
    .lock                           writer lock (one writing process per index)

Consistency protocol between SQL and FAISS
------------------------------------------
SQL is the authority on *what exists*; the FAISS file is the authority on *which vectors are
durable*. Every region row carries ``vector_state`` (``pending`` / ``committed`` / ``missing``)
and a ``deleted`` tombstone. Ids come from the database and are never reused.

Write order (``add_image_regions`` then ``checkpoint``)::

    W1  SQL transaction: tombstone the image's previous regions (deleted=true), insert the new
        region rows with vector_state='pending' (this allocates their ids), image status
        'pending'; COMMIT.
    W2  FAISS (in memory): remove the old ids, add the new vectors under the new ids.
    C1  checkpoint: write the FAISS file atomically (tmp, fsync, rename, fsync dir).
    C2  SQL transaction: rows added since the last checkpoint -> 'committed'; their images ->
        'indexed' (when none of their live regions is still pending/missing); manifest counts;
        COMMIT.

Deletes: SQL tombstone first (COMMIT), then FAISS remove, durable at the next checkpoint.
Search results are always joined with SQL, which drops tombstoned rows, so a deleted region
never shows even before its vector is gone.

Reconciliation (every writable ``open``; also ``reconcile()``), F = live ids in the FAISS file::

    R1  pending rows of an image whose vectors are *all* in F (crash between C1 and C2)
        -> promoted to 'committed', image 'indexed';
    R2  other pending rows (crash before C1) -> deleted, their images back to 'pending';
    R3  ids in F without a live committed row (orphans: rows deleted or dropped in R2)
        -> removed from FAISS;
    R4  live committed rows whose id is not in F (vector file lost/older) -> 'missing',
        their images back to 'pending' (re-embed: ``restore_vectors`` or re-index the image);
    R5  if FAISS changed, it is saved (atomically) before returning.

Why ``kill -9`` anywhere is safe: before C1 the file on disk is the previous checkpoint and every
row added since is 'pending' (R2 drops them, R3 drops any stray vector); between C1 and C2 the
file holds every pending vector (R1 keeps the work); a crash inside a SQL transaction rolls it
back; ``os.replace`` never exposes a half-written file; ids are never reused, so a stale FAISS id
cannot name a different region. Re-running reconciliation is idempotent.

Read-only opens (an API server next to a running indexer) skip reconciliation and never write;
``reload_if_changed()`` picks up a newer FAISS file after the writer's checkpoints.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import and_, bindparam, delete, exists, func, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from regionsearch.errors import RegionSearchError

from .backend import RegionFilter
from .db import Database, open_database
from .manifest import (
    DESCRIPTION_KEY,
    IndexMismatchError,
    ManifestInfo,
    check_manifest,
    normalize_description,
    read_manifest_json,
    write_manifest_json,
)
from .models import (
    METRIC_IP,
    SCHEMA_VERSION,
    Image,
    ImageStatus,
    Manifest,
    Region,
    VectorState,
    utcnow,
)
from .vectors import DEFAULT_FACTORY, VectorStore, normalize_factory

try:  # POSIX advisory locks; on other platforms the writer lock is skipped
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

DB_FILE = "regions.db"
VECTORS_FILE = "vectors.faiss"
LOCK_FILE = ".lock"
SQL_CHUNK = 5000  # ids per IN (...) list (rendered inline: no bound-parameter limit applies)
MAX_ERROR_CHARS = 8000

_PENDING = VectorState.PENDING.value
_COMMITTED = VectorState.COMMITTED.value
_MISSING = VectorState.MISSING.value


class IndexNotFoundError(RegionSearchError, FileNotFoundError):
    """No index at the given directory / database."""


class IndexLockedError(RegionSearchError, RuntimeError):
    """Another process holds this index open for writing."""


class ReadOnlyIndexError(RegionSearchError, RuntimeError):
    """A write was attempted on an index opened with ``read_only=True``."""


# ----------------------------------------------------------------------------- records


@dataclass(frozen=True)
class NewRegion:
    """A region to store: full-image COCO RLE, COCO bbox ``(x, y, w, h)``, mask area in pixels."""

    rle: dict[str, Any]
    bbox: tuple[float, float, float, float]
    area: float
    source: str
    source_score: float | None = None
    category: str | None = None
    external_id: str | None = None


@dataclass(frozen=True)
class ImageRecord:
    id: int
    path: str
    content_hash: str | None
    size_bytes: int | None
    mtime: float | None
    width: int | None
    height: int | None
    status: str
    error: str | None
    indexed_at: dt.datetime | None
    created_at: dt.datetime | None

    @classmethod
    def from_row(cls, row: Image) -> ImageRecord:
        return cls(
            id=row.id,
            path=row.path,
            content_hash=row.content_hash,
            size_bytes=row.size_bytes,
            mtime=row.mtime,
            width=row.width,
            height=row.height,
            status=row.status,
            error=row.error,
            indexed_at=row.indexed_at,
            created_at=row.created_at,
        )


@dataclass(frozen=True)
class RegionRecord:
    id: int
    image_id: int
    image_path: str
    image_width: int | None
    image_height: int | None
    rle: dict[str, Any]
    bbox: tuple[float, float, float, float]
    area: float
    source: str
    source_score: float | None
    category: str | None
    external_id: str | None
    embedder: str
    vector_state: str
    deleted: bool


@dataclass
class ReconcileReport:
    """What ``reconcile()`` repaired (all zero: SQL and FAISS agreed)."""

    promoted: int = 0  # pending rows whose vectors were durable -> committed
    pending_dropped: int = 0  # pending rows without durable vectors -> deleted
    orphans_removed: int = 0  # FAISS ids without a live committed row -> removed
    missing_marked: int = 0  # committed rows without a vector -> 'missing'
    images_reset: int = 0  # images set back to 'pending'
    images_indexed: int = 0  # images completed by promotion

    @property
    def clean(self) -> bool:
        return not (
            self.promoted or self.pending_dropped or self.orphans_removed or self.missing_marked
        )


@dataclass
class IndexStats:
    name: str
    model: str
    embedder: str
    dimension: int
    factory: str
    images: dict[str, int] = field(default_factory=dict)  # by status
    regions: int = 0  # live regions with a committed vector
    regions_pending: int = 0
    regions_missing: int = 0
    regions_deleted: int = 0  # SQL tombstones
    vectors: int = 0  # live vectors in FAISS (in memory)
    vector_tombstones: int = 0  # FAISS vectors hidden, awaiting compaction/rebuild
    unflushed: int = 0  # vectors added since the last checkpoint


# ----------------------------------------------------------------------------- helpers


def _chunks(values: Sequence[int], size: int = SQL_CHUNK) -> Iterator[list[int]]:
    for start in range(0, len(values), size):
        yield [int(v) for v in values[start : start + size]]


def _update(model: Any) -> Any:
    return update(model).execution_options(synchronize_session=False)


def _delete(model: Any) -> Any:
    return delete(model).execution_options(synchronize_session=False)


def _in(column: Any, values: list[int]) -> Any:
    """``column IN (...)`` with the integers rendered inline (no parameter-count limits)."""
    return column.in_(bindparam(f"in_{column.key}", values, expanding=True, literal_execute=True))


def _validate_region(region: NewRegion) -> NewRegion:
    rle = region.rle
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise ValueError('region.rle must be a COCO RLE dict {"size": [H, W], "counts": str}')
    counts = rle["counts"]
    if isinstance(counts, bytes | bytearray):  # pycocotools returns bytes
        rle = {**rle, "counts": bytes(counts).decode("ascii")}
    elif not isinstance(counts, str | list):
        raise ValueError("region.rle['counts'] must be a str (compressed RLE) or a list")
    size = [int(v) for v in rle["size"]]
    if len(size) != 2:
        raise ValueError("region.rle['size'] must be [H, W]")
    rle = {**rle, "size": size}
    if len(region.bbox) != 4:
        raise ValueError("region.bbox must be (x, y, w, h)")
    if not region.source or len(region.source) > 32:
        raise ValueError("region.source must be a short non-empty string (e.g. 'proposal')")
    return NewRegion(
        rle=rle,
        bbox=tuple(float(v) for v in region.bbox),  # type: ignore[arg-type]
        area=float(region.area),
        source=region.source,
        source_score=None if region.source_score is None else float(region.source_score),
        category=region.category,
        external_id=None if region.external_id is None else str(region.external_id),
    )


# ----------------------------------------------------------------------------- the index


class RegionIndex:
    """One region index: images and regions in SQL, their vectors in FAISS.

    Open with :meth:`open` / :meth:`create`; use as a context manager (``close`` checkpoints).
    """

    def __init__(
        self,
        directory: Path,
        db: Database,
        manifest: ManifestInfo,
        vectors: VectorStore,
        *,
        read_only: bool,
        lock_fd: int | None,
        default_db: bool,
        checkpoint_every_s: float | None,
        checkpoint_every_vectors: int | None,
    ) -> None:
        self.directory = directory
        self.db = db
        self._manifest = manifest
        self.vectors = vectors
        self.read_only = read_only
        self._lock_fd = lock_fd
        self._default_db = default_db
        self.checkpoint_every_s = checkpoint_every_s
        self.checkpoint_every_vectors = checkpoint_every_vectors
        self._lock = threading.RLock()
        self._unflushed_ids: list[int] = []
        self._unflushed_images: set[int] = set()
        self._dirty = False  # FAISS changed since the last save
        self._counts_stale = False  # SQL changed since the last checkpoint
        self._last_checkpoint = time.monotonic()
        self._vectors_mtime = self._file_mtime(self.vectors_path)
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
        factory: str = DEFAULT_FACTORY,
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
    ) -> RegionIndex:
        """Open (or with ``create=True`` create) the index stored in ``directory``.

        ``model``/``embedder``/``dimension``/``factory`` given for an existing index must match
        its manifest (:class:`IndexMismatchError` otherwise); ``None`` accepts what it holds.
        ``db_url``: any SQLAlchemy URL; default ``sqlite:///<directory>/regions.db``.
        ``read_only``: no lock, no reconciliation, no writes (``mmap=True`` requires it).
        A writable open takes the directory's writer lock and reconciles SQL with FAISS.
        """
        directory = Path(directory).expanduser().resolve()
        name = directory.name
        if mmap and not read_only:
            raise ValueError("mmap=True needs read_only=True (a memory-mapped index is immutable)")
        json_copy = read_manifest_json(directory) if directory.exists() else None
        default_db = db_url is None
        if db_url is None:
            recorded = json_copy.database if json_copy else None
            if recorded and make_url(recorded).get_backend_name() != "sqlite":
                raise ValueError(
                    f"index {name!r} keeps its metadata in {recorded}; pass db_url= (with the "
                    "password) to open it"
                )
            db_file = directory / DB_FILE
            if not create and not db_file.exists():
                raise IndexNotFoundError(
                    f"no index at {directory} (no {DB_FILE}); create it first, e.g. by "
                    f"indexing with --name {name}"
                )
            db_url = f"sqlite:///{db_file}"
        if create:
            directory.mkdir(parents=True, exist_ok=True)
        elif not directory.exists():
            raise IndexNotFoundError(f"no index directory {directory}")

        lock_fd = None if read_only else cls._acquire_lock(directory)
        db: Database | None = None
        try:
            db = open_database(db_url)
            manifest = cls._load_or_create_manifest(
                db,
                directory,
                name=name,
                model=model,
                embedder=embedder,
                dimension=dimension,
                factory=factory,
                create=create and not read_only,
                check_name=not default_db,
                image_root=image_root,
            )
            vectors_path = directory / VECTORS_FILE
            options = dict(vector_options or {})
            if vectors_path.exists():
                vectors = VectorStore.open(
                    vectors_path, factory=manifest.factory, mmap=mmap, use_gpu=use_gpu, **options
                )
                if vectors.dimension != manifest.dimension:
                    raise IndexMismatchError(
                        name,
                        {"dimension": vectors.dimension},
                        {"dimension": manifest.dimension},
                        location=str(vectors_path),
                        reason="The FAISS file does not match the manifest of its own index "
                        "(was it copied from another index?).",
                    )
            else:
                vectors = VectorStore(
                    manifest.dimension, manifest.factory, use_gpu=use_gpu, **options
                )
            index = cls(
                directory,
                db,
                manifest,
                vectors,
                read_only=read_only,
                lock_fd=lock_fd,
                default_db=default_db,
                checkpoint_every_s=checkpoint_every_s,
                checkpoint_every_vectors=checkpoint_every_vectors,
            )
        except BaseException:
            if db is not None:
                db.dispose()
            cls._release_lock(lock_fd)
            raise
        if not read_only:
            try:
                index.reconcile()
                if not vectors_path.exists():
                    index.vectors.save(index.vectors_path)
                    index._vectors_mtime = index._file_mtime(index.vectors_path)
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
        """The manifest copy of ``directory`` (cheap: no database, no FAISS); None if absent."""
        return read_manifest_json(directory)

    @staticmethod
    def _acquire_lock(directory: Path) -> int | None:
        if fcntl is None:  # pragma: no cover
            return None
        fd = os.open(directory / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = ""
            with contextlib.suppress(OSError, ValueError):
                holder = os.read(fd, 32).decode().strip()
            os.close(fd)
            by = f" (process {holder})" if holder.isdigit() else ""
            raise IndexLockedError(
                f"index {directory.name!r} is being written by another process{by}, e.g. "
                "`regionsearch index` or an upload to `regionsearch serve`; run this again when "
                "it has finished (searching, `stats` and `serve` work meanwhile)"
            ) from exc
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return fd

    @staticmethod
    def _release_lock(fd: int | None) -> None:
        if fd is None:
            return
        with contextlib.suppress(OSError):
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    @staticmethod
    def _load_or_create_manifest(
        db: Database,
        directory: Path,
        *,
        name: str,
        model: str | None,
        embedder: str | None,
        dimension: int | None,
        factory: str | None,
        create: bool,
        check_name: bool,
        image_root: str | None,
    ) -> ManifestInfo:
        safe_url = db.url.render_as_string(hide_password=True)
        with db.session() as s:
            row = s.scalars(select(Manifest).order_by(Manifest.id).limit(1)).first()
            if row is None:
                if not create:
                    raise IndexNotFoundError(f"{safe_url} holds no region index (no manifest)")
                missing = [
                    k
                    for k, v in (("model", model), ("embedder", embedder), ("dimension", dimension))
                    if v is None
                ]
                if missing:
                    raise ValueError(f"creating index {name!r} needs {', '.join(missing)}")
                row = Manifest(
                    name=name,
                    model=str(model),
                    embedder=str(embedder),
                    dimension=int(dimension),  # type: ignore[arg-type]
                    metric=METRIC_IP,
                    factory=normalize_factory(factory or DEFAULT_FACTORY),
                    schema_version=SCHEMA_VERSION,
                    image_root=image_root,
                    extra={},
                )
                s.add(row)
                s.flush()
                log.info("created index %r (%s) in %s", name, row, safe_url)
            else:
                info = ManifestInfo.from_row(row)
                if check_name and row.name != name:
                    raise IndexMismatchError(
                        name,
                        {"name": row.name, **info.identity()},
                        {"name": name},
                        location=safe_url,
                        reason=(
                            f"This database already holds the index {row.name!r}; one database "
                            "(or PostgreSQL schema) holds exactly one index."
                        ),
                    )
                check_manifest(
                    info,
                    model=model,
                    embedder=embedder,
                    dimension=dimension,
                    factory=factory,
                    location=str(directory),
                )
                if image_root is not None and row.image_root != image_root:
                    row.image_root = image_root
                if row.schema_version != SCHEMA_VERSION:
                    row.schema_version = SCHEMA_VERSION
            return ManifestInfo.from_row(row, database=safe_url)

    # ------------------------------------------------------------------ properties

    @property
    def name(self) -> str:
        return self._manifest.name

    @property
    def manifest(self) -> ManifestInfo:
        return self._manifest

    @property
    def vectors_path(self) -> Path:
        return self.directory / VECTORS_FILE

    @property
    def embedder(self) -> str:
        return self._manifest.embedder

    @property
    def model(self) -> str:
        return self._manifest.model

    @property
    def dimension(self) -> int:
        return self._manifest.dimension

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

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """A SQL session in a transaction (advanced use: the models are in ``store.models``)."""
        with self.db.session() as s:
            yield s

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
        return self.upsert_images(
            [
                {
                    "path": path,
                    "content_hash": content_hash,
                    "size_bytes": size_bytes,
                    "mtime": mtime,
                    "width": width,
                    "height": height,
                }
            ]
        )[0]

    def upsert_images(self, items: Iterable[dict[str, Any]]) -> list[ImageRecord]:
        """Insert or update image rows in one transaction; returns them in input order.

        Each item has ``path`` and optionally ``content_hash``, ``size_bytes``, ``mtime``,
        ``width``, ``height``. New images are 'pending'. An existing image goes back to
        'pending' when its ``content_hash`` changes or it was 'deleted' (the file came back);
        otherwise its status is kept, so unchanged indexed images are skipped by the indexer.
        """
        self._writable()
        items = list(items)
        fields = ("content_hash", "size_bytes", "mtime", "width", "height")
        out: dict[str, Image] = {}
        with self.db.session() as s:
            paths = [str(it["path"]) for it in items]
            existing: dict[str, Image] = {}
            for start in range(0, len(paths), SQL_CHUNK):
                chunk = paths[start : start + SQL_CHUNK]
                for row in s.scalars(select(Image).where(Image.path.in_(chunk))):
                    existing[row.path] = row
            for it in items:
                path = str(it["path"])
                row = existing.get(path) or out.get(path)
                if row is None:
                    row = Image(path=path, status=ImageStatus.PENDING.value)
                    for f in fields:
                        setattr(row, f, it.get(f))
                    s.add(row)
                else:
                    new_hash = it.get("content_hash")
                    changed = new_hash is not None and new_hash != row.content_hash
                    for f in fields:
                        if it.get(f) is not None:
                            setattr(row, f, it.get(f))
                    if changed or row.status == ImageStatus.DELETED.value:
                        row.status = ImageStatus.PENDING.value
                        row.error = None
                out[path] = row
            s.flush()
            return [ImageRecord.from_row(out[str(it["path"])]) for it in items]

    def get_image(self, path: str) -> ImageRecord | None:
        with self.db.session() as s:
            row = s.scalars(select(Image).where(Image.path == str(path))).first()
            return ImageRecord.from_row(row) if row else None

    def get_image_by_id(self, image_id: int) -> ImageRecord | None:
        with self.db.session() as s:
            row = s.get(Image, int(image_id))
            return ImageRecord.from_row(row) if row else None

    def images_by_paths(self, paths: Iterable[str]) -> dict[str, ImageRecord]:
        """Lookup of many paths (chunked ``IN``): ``{path: record}`` for the known ones."""
        paths = [str(p) for p in paths]
        found: dict[str, ImageRecord] = {}
        with self.db.session() as s:
            for start in range(0, len(paths), SQL_CHUNK):
                chunk = paths[start : start + SQL_CHUNK]
                for row in s.scalars(select(Image).where(Image.path.in_(chunk))):
                    found[row.path] = ImageRecord.from_row(row)
        return found

    def images_by_hash(self, content_hash: str) -> list[ImageRecord]:
        """Images with this sha256 (duplicates of one file under several paths)."""
        with self.db.session() as s:
            rows = s.scalars(
                select(Image).where(Image.content_hash == content_hash).order_by(Image.id)
            )
            return [ImageRecord.from_row(r) for r in rows]

    def iter_images(
        self, status: str | ImageStatus | None = None, *, batch_size: int = 1000
    ) -> Iterator[ImageRecord]:
        """All images (or those with ``status``) in id order, paged by id (no OFFSET)."""
        status_value = status.value if isinstance(status, ImageStatus) else status
        last = -1
        while True:
            with self.db.session() as s:
                q = select(Image).where(Image.id > last)
                if status_value is not None:
                    q = q.where(Image.status == status_value)
                rows = list(s.scalars(q.order_by(Image.id).limit(batch_size)))
                records = [ImageRecord.from_row(r) for r in rows]
            if not records:
                return
            yield from records
            last = records[-1].id

    def pending_images(self, limit: int | None = None) -> list[ImageRecord]:
        """Images to (re)process: status 'pending', minus those staged since the last checkpoint."""
        out: list[ImageRecord] = []
        for rec in self.iter_images(ImageStatus.PENDING):
            if rec.id in self._unflushed_images:
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
                self._delete_regions_of([int(image_id)])
            with self.db.session() as s:
                s.execute(
                    _update(Image)
                    .where(Image.id == int(image_id))
                    .values(status=ImageStatus.FAILED.value, error=str(error)[:MAX_ERROR_CHARS])
                )
            self._unflushed_images.discard(int(image_id))
            self._counts_stale = True

    def delete_image(self, image_id: int) -> int:
        """The file is gone: tombstone its regions, status 'deleted'. Returns regions removed."""
        return self.delete_images([image_id])

    def delete_images(self, image_ids: Iterable[int]) -> int:
        self._writable()
        ids = [int(i) for i in image_ids]
        with self._lock:
            n = self._delete_regions_of(ids)
            with self.db.session() as s:
                for chunk in _chunks(ids):
                    s.execute(
                        _update(Image)
                        .where(_in(Image.id, chunk))
                        .values(status=ImageStatus.DELETED.value)
                    )
            self._unflushed_images.difference_update(ids)
            self._counts_stale = True
            return n

    def delete_image_regions(self, image_id: int) -> int:
        """Tombstone all live regions of an image and remove their vectors; returns the count."""
        self._writable()
        with self._lock:
            return self._delete_regions_of([int(image_id)])

    def _delete_regions_of(self, image_ids: list[int]) -> int:
        region_ids: list[int] = []
        with self.db.session() as s:
            for chunk in _chunks(image_ids):
                cond = and_(_in(Region.image_id, chunk), Region.deleted.is_(False))
                region_ids += list(s.scalars(select(Region.id).where(cond)))
                s.execute(_update(Region).where(cond).values(deleted=True))
        if region_ids:
            self.vectors.remove(np.asarray(region_ids, dtype=np.int64))
            self._dirty = True
            self._counts_stale = True
        return len(region_ids)

    def record_embedder_description(self, described: dict[str, Any]) -> None:
        """Record the embedder's ``describe()`` in the manifest (see ``store.manifest``)."""
        self._writable()
        value = normalize_description(described)
        with self._lock, self.db.session() as s:
            row = s.scalars(select(Manifest).order_by(Manifest.id).limit(1)).one()
            row.extra = {**(row.extra or {}), DESCRIPTION_KEY: value}  # new dict: JSON change
        self._manifest.extra = {**self._manifest.extra, DESCRIPTION_KEY: value}
        self._write_manifest_json()

    def set_image_root(self, image_root: str | None) -> None:
        """Record the photo root that relative ``Image.path`` values refer to."""
        self._writable()
        with self.db.session() as s:
            row = s.scalars(select(Manifest).order_by(Manifest.id).limit(1)).one()
            row.image_root = image_root
        self._manifest.image_root = image_root
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
        """Batch of :meth:`add_image_regions`: one SQL transaction and one FAISS add."""
        self._writable()
        prepared: list[tuple[int, list[NewRegion], np.ndarray]] = []
        for image_id, regions, vecs in items:
            regions = [_validate_region(r) for r in regions]
            vecs = np.asarray(vecs)
            if vecs.size == 0 and not regions:
                vecs = np.empty((0, self.dimension), dtype=np.float32)
            vecs = self.vectors.validate_vectors(vecs, n=len(regions))
            prepared.append((int(image_id), regions, vecs))
        image_ids = [p[0] for p in prepared]
        if len(set(image_ids)) != len(image_ids):
            raise ValueError("an image appears twice in one add_images_regions batch")
        with self._lock:
            # W1: rows first (ids allocated by the database), committed as 'pending'.
            old_ids: list[int] = []
            new_rows: list[list[Region]] = []
            now = utcnow()
            with self.db.session() as s:
                known = set()
                for chunk in _chunks(image_ids):
                    known.update(s.scalars(select(Image.id).where(_in(Image.id, chunk))))
                unknown = [i for i in image_ids if i not in known]
                if unknown:
                    raise KeyError(f"unknown image ids {unknown[:5]} (upsert_image first)")
                if replace:
                    for chunk in _chunks(image_ids):
                        cond = and_(_in(Region.image_id, chunk), Region.deleted.is_(False))
                        old_ids += list(s.scalars(select(Region.id).where(cond)))
                        s.execute(_update(Region).where(cond).values(deleted=True))
                for image_id, regions, _ in prepared:
                    rows = [
                        Region(
                            image_id=image_id,
                            rle=r.rle,
                            bbox_x=r.bbox[0],
                            bbox_y=r.bbox[1],
                            bbox_w=r.bbox[2],
                            bbox_h=r.bbox[3],
                            area=r.area,
                            source=r.source,
                            source_score=r.source_score,
                            category=r.category,
                            external_id=r.external_id,
                            embedder=self.embedder,
                            vector_state=_PENDING,
                            deleted=False,
                        )
                        for r in regions
                    ]
                    s.add_all(rows)
                    new_rows.append(rows)
                s.flush()
                with_regions = [p[0] for p, rows in zip(prepared, new_rows, strict=True) if rows]
                without = [p[0] for p, rows in zip(prepared, new_rows, strict=True) if not rows]
                for chunk in _chunks(with_regions):
                    s.execute(
                        _update(Image)
                        .where(_in(Image.id, chunk))
                        .values(status=ImageStatus.PENDING.value, error=None)
                    )
                for chunk in _chunks(without):  # nothing to make durable: done now
                    s.execute(
                        _update(Image)
                        .where(_in(Image.id, chunk))
                        .values(status=ImageStatus.INDEXED.value, error=None, indexed_at=now)
                    )
            ids_per_image = [np.array([r.id for r in rows], dtype=np.int64) for rows in new_rows]
            self._counts_stale = True
            # W2: FAISS in memory.
            if old_ids:
                self.vectors.remove(np.asarray(old_ids, dtype=np.int64))
                self._dirty = True
            all_ids = np.concatenate(ids_per_image) if ids_per_image else np.empty(0, np.int64)
            if all_ids.size:
                all_vecs = np.concatenate([p[2] for p in prepared], axis=0)
                try:
                    self.vectors.add(all_ids, all_vecs)
                except BaseException:
                    self._drop_pending_rows(all_ids.tolist())
                    raise
                self._dirty = True
                self._unflushed_ids.extend(all_ids.tolist())
                self._unflushed_images.update(with_regions)
            self._maybe_checkpoint()
            return ids_per_image

    def _drop_pending_rows(self, ids: list[int]) -> None:
        """Best effort after a failed FAISS add (reconciliation would do the same on reopen)."""
        try:
            with self.db.session() as s:
                for chunk in _chunks(ids):
                    s.execute(
                        _delete(Region).where(
                            _in(Region.id, chunk), Region.vector_state == _PENDING
                        )
                    )
        except Exception:  # pragma: no cover
            log.exception("could not drop pending rows after a failed FAISS add")

    def restore_vectors(self, region_ids: Any, vectors: np.ndarray) -> None:
        """Give 'missing' regions (found by reconciliation) their re-computed vectors."""
        self._writable()
        ids = np.asarray(region_ids, dtype=np.int64)
        vecs = self.vectors.validate_vectors(vectors, n=ids.size)
        if ids.size == 0:
            return
        with self._lock:
            with self.db.session() as s:
                rows = []
                for chunk in _chunks(ids.tolist()):
                    rows += list(
                        s.execute(
                            select(Region.id, Region.image_id).where(
                                _in(Region.id, chunk),
                                Region.vector_state == _MISSING,
                                Region.deleted.is_(False),
                            )
                        )
                    )
                if len(rows) != ids.size:
                    found = {r.id for r in rows}
                    bad = [i for i in ids.tolist() if i not in found][:5]
                    raise KeyError(f"regions {bad} are not live regions with a missing vector")
                for chunk in _chunks(ids.tolist()):
                    s.execute(
                        _update(Region).where(_in(Region.id, chunk)).values(vector_state=_PENDING)
                    )
            self.vectors.add(ids, vecs)
            self._dirty = True
            self._unflushed_ids.extend(ids.tolist())
            self._unflushed_images.update(int(r.image_id) for r in rows)
            self._maybe_checkpoint()

    def regions_missing_vectors(self, limit: int | None = None) -> list[RegionRecord]:
        """Live regions whose vector was lost (state 'missing'): re-embed and ``restore_vectors``."""
        q = self._region_select().where(Region.vector_state == _MISSING, Region.deleted.is_(False))
        q = q.order_by(Region.id)
        if limit is not None:
            q = q.limit(limit)
        with self.db.session() as s:
            return [self._region_record(r) for r in s.execute(q)]

    # ------------------------------------------------------------------ reading regions

    @staticmethod
    def _region_select() -> Any:
        return select(
            Region.id,
            Region.image_id,
            Image.path,
            Image.width,
            Image.height,
            Region.rle,
            Region.bbox_x,
            Region.bbox_y,
            Region.bbox_w,
            Region.bbox_h,
            Region.area,
            Region.source,
            Region.source_score,
            Region.category,
            Region.external_id,
            Region.embedder,
            Region.vector_state,
            Region.deleted,
        ).join(Image, Image.id == Region.image_id)

    @staticmethod
    def _region_record(r: Any) -> RegionRecord:
        return RegionRecord(
            id=int(r.id),
            image_id=int(r.image_id),
            image_path=r.path,
            image_width=r.width,
            image_height=r.height,
            rle=r.rle,
            bbox=(r.bbox_x, r.bbox_y, r.bbox_w, r.bbox_h),
            area=r.area,
            source=r.source,
            source_score=r.source_score,
            category=r.category,
            external_id=r.external_id,
            embedder=r.embedder,
            vector_state=r.vector_state,
            deleted=bool(r.deleted),
        )

    def fetch_regions(self, ids: Any, *, include_deleted: bool = False) -> list[RegionRecord]:
        """Regions (with their image path/size) for ``ids``, **in the order given**.

        One ``SELECT ... JOIN images WHERE regions.id IN (...)`` per 5000 ids, by primary key,
        no ORDER BY; order restored in Python. Unknown ids, ``-1`` padding and deleted regions
        (unless ``include_deleted``) are skipped, so match results to scores by ``record.id``.
        """
        wanted = [int(i) for i in np.asarray(ids, dtype=np.int64).ravel() if i >= 0]
        if not wanted:
            return []
        unique = list(dict.fromkeys(wanted))
        found: dict[int, RegionRecord] = {}
        with self.db.session() as s:
            for chunk in _chunks(unique):
                q = self._region_select().where(_in(Region.id, chunk))
                if not include_deleted:
                    q = q.where(Region.deleted.is_(False))
                for r in s.execute(q):
                    found[int(r.id)] = self._region_record(r)
        return [found[i] for i in wanted if i in found]

    def regions_of_image(self, image_id: int) -> list[RegionRecord]:
        """Live regions of one image, by id."""
        q = (
            self._region_select()
            .where(Region.image_id == int(image_id), Region.deleted.is_(False))
            .order_by(Region.id)
        )
        with self.db.session() as s:
            return [self._region_record(r) for r in s.execute(q)]

    def region_ids_for_images(self, image_ids: Iterable[int]) -> np.ndarray:
        """Live region ids of these images (e.g. a search filter), sorted."""
        ids = [int(i) for i in image_ids]
        out: list[int] = []
        with self.db.session() as s:
            for chunk in _chunks(ids):
                out += list(
                    s.scalars(
                        select(Region.id).where(
                            _in(Region.image_id, chunk), Region.deleted.is_(False)
                        )
                    )
                )
        return np.unique(np.asarray(out, dtype=np.int64))

    # ------------------------------------------------------------------ search

    def _selector(self, image_ids: Iterable[int] | None, region_ids: Any) -> np.ndarray | None:
        sel = None
        if image_ids is not None:
            sel = self.region_ids_for_images(image_ids)
        if region_ids is not None:
            r = np.unique(np.asarray(region_ids, dtype=np.int64))
            sel = r if sel is None else np.intersect1d(sel, r, assume_unique=True)
        return sel

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        image_ids: Iterable[int] | None = None,
        region_ids: Any = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """FAISS k-NN, optionally restricted to some images / region ids: (scores, ids).

        Returns raw FAISS results (ids -1 / scores -inf where fewer than k); pair them with
        :meth:`fetch_regions`.
        """
        sel = self._selector(image_ids, region_ids)
        with self._lock:
            return self.vectors.search(
                queries, k, None if sel is None else RegionFilter.from_ids(sel)
            )

    def range_search(
        self,
        query: np.ndarray,
        threshold: float,
        *,
        image_ids: Iterable[int] | None = None,
        region_ids: Any = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """All regions with score >= ``threshold`` for one query: (scores, ids), best first."""
        sel = self._selector(image_ids, region_ids)
        with self._lock:
            return self.vectors.range_search(
                query, threshold, None if sel is None else RegionFilter.from_ids(sel)
            )

    # ------------------------------------------------------------------ checkpoint / close

    def _maybe_checkpoint(self) -> None:
        n = len(self._unflushed_ids)
        if not n:
            return
        by_count = self.checkpoint_every_vectors and n >= self.checkpoint_every_vectors
        by_time = (
            self.checkpoint_every_s is not None
            and time.monotonic() - self._last_checkpoint >= self.checkpoint_every_s
        )
        if by_count or by_time:
            self.checkpoint()

    def checkpoint(self) -> None:
        """Make everything added/removed so far durable (C1 FAISS file, then C2 SQL)."""
        if self.read_only or self._closed:
            return
        with self._lock:
            if self._dirty or not self.vectors_path.exists():
                self.vectors.save(self.vectors_path)  # C1
                self._vectors_mtime = self._file_mtime(self.vectors_path)
                self._dirty = False
            if self._unflushed_ids or self._unflushed_images or self._counts_stale:
                self._commit_flushed()  # C2
            self._last_checkpoint = time.monotonic()
            self._write_manifest_json()

    def _commit_flushed(self) -> None:
        ids = self._unflushed_ids
        images = sorted(self._unflushed_images)
        now = utcnow()
        with self.db.session() as s:
            for chunk in _chunks(ids):
                s.execute(
                    _update(Region)
                    .where(_in(Region.id, chunk), Region.vector_state == _PENDING)
                    .values(vector_state=_COMMITTED)
                )
            self._mark_images_indexed(s, images, now)
            self._update_counts(s)
        self._unflushed_ids = []
        self._unflushed_images = set()
        self._counts_stale = False

    @staticmethod
    def _mark_images_indexed(s: Session, image_ids: list[int], now: dt.datetime) -> int:
        """'indexed' for those of ``image_ids`` with no live region still pending/missing."""
        n = 0
        unfinished = exists().where(
            Region.image_id == Image.id,
            Region.deleted.is_(False),
            Region.vector_state != _COMMITTED,
        )
        for chunk in _chunks(image_ids):
            res = s.execute(
                _update(Image)
                .where(
                    _in(Image.id, chunk),
                    Image.status == ImageStatus.PENDING.value,
                    ~unfinished,
                )
                .values(status=ImageStatus.INDEXED.value, indexed_at=now, error=None)
            )
            n += res.rowcount or 0
        return n

    def _update_counts(self, s: Session) -> None:
        row = s.scalars(select(Manifest).order_by(Manifest.id).limit(1)).one()
        row.n_images = s.scalar(
            select(func.count()).select_from(Image).where(Image.status == ImageStatus.INDEXED.value)
        )
        row.n_regions = s.scalar(
            select(func.count())
            .select_from(Region)
            .where(Region.vector_state == _COMMITTED, Region.deleted.is_(False))
        )
        row.n_vectors = self.vectors.ntotal
        row.updated_at = utcnow()
        s.flush()
        self._manifest.n_images = int(row.n_images or 0)
        self._manifest.n_regions = int(row.n_regions or 0)
        self._manifest.n_vectors = int(row.n_vectors or 0)
        self._manifest.updated_at = row.updated_at.isoformat()

    def _write_manifest_json(self) -> None:
        try:
            write_manifest_json(self.directory, self._manifest)
        except OSError:  # pragma: no cover - the JSON copy is informational
            log.warning("could not write %s", self.directory / "manifest.json", exc_info=True)

    def close(self) -> None:
        """Checkpoint (writers), release the writer lock and the database connections."""
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
        self.db.dispose()
        self._release_lock(self._lock_fd)
        self._lock_fd = None

    # ------------------------------------------------------------------ reconcile / reload

    def reconcile(self) -> ReconcileReport:
        """Repair SQL/FAISS disagreements left by a crash (protocol R1-R5, module docstring)."""
        self._writable()
        report = ReconcileReport()
        with self._lock:
            durable = self.vectors.ids()  # F
            with self.db.session() as s:
                committed = np.fromiter(
                    s.scalars(
                        select(Region.id).where(
                            Region.vector_state == _COMMITTED, Region.deleted.is_(False)
                        )
                    ),
                    dtype=np.int64,
                )
                pending = list(
                    s.execute(
                        select(Region.id, Region.image_id).where(
                            Region.vector_state == _PENDING, Region.deleted.is_(False)
                        )
                    )
                )
                stale_pending = list(
                    s.scalars(
                        select(Region.id).where(
                            Region.vector_state == _PENDING, Region.deleted.is_(True)
                        )
                    )
                )
                pending_ids = np.asarray([int(r.id) for r in pending], dtype=np.int64)
                durable_mask = self.vectors.contains(pending_ids)
                by_image: dict[int, list[tuple[int, bool]]] = {}
                for (rid, iid), ok in zip(pending, durable_mask.tolist(), strict=True):
                    by_image.setdefault(int(iid), []).append((int(rid), ok))
                promote: list[int] = []
                drop: list[int] = []
                promoted_images: list[int] = []
                reset_images: set[int] = set()
                for iid, entries in by_image.items():
                    rids = [rid for rid, _ in entries]
                    if all(ok for _, ok in entries):  # R1
                        promote += rids
                        promoted_images.append(iid)
                    else:  # R2
                        drop += rids
                        reset_images.add(iid)
                drop += [int(i) for i in stale_pending]  # tombstoned before their checkpoint
                keep = np.union1d(committed, np.asarray(promote, dtype=np.int64))
                orphans = np.setdiff1d(durable, keep, assume_unique=False)  # R3
                missing = np.setdiff1d(committed, durable, assume_unique=False)  # R4
                for chunk in _chunks(promote):
                    s.execute(
                        _update(Region).where(_in(Region.id, chunk)).values(vector_state=_COMMITTED)
                    )
                for chunk in _chunks(drop):
                    s.execute(_delete(Region).where(_in(Region.id, chunk)))
                missing_images: list[int] = []
                for chunk in _chunks(missing.tolist()):
                    missing_images += list(
                        s.scalars(select(Region.image_id).where(_in(Region.id, chunk)).distinct())
                    )
                    s.execute(
                        _update(Region).where(_in(Region.id, chunk)).values(vector_state=_MISSING)
                    )
                reset_images.update(int(i) for i in missing_images)
                reset = sorted(reset_images)
                for chunk in _chunks(reset):
                    res = s.execute(
                        _update(Image)
                        .where(_in(Image.id, chunk), Image.status != ImageStatus.DELETED.value)
                        .values(status=ImageStatus.PENDING.value)
                    )
                    report.images_reset += res.rowcount or 0
                report.images_indexed = self._mark_images_indexed(s, promoted_images, utcnow())
                report.promoted = len(promote)
                report.pending_dropped = len(drop)
                report.missing_marked = int(missing.size)
            if orphans.size:
                report.orphans_removed = self.vectors.remove(orphans)
                self._dirty = True
            if self._dirty:  # R5
                self.vectors.save(self.vectors_path)
                self._vectors_mtime = self._file_mtime(self.vectors_path)
                self._dirty = False
            with self.db.session() as s:
                self._update_counts(s)
        if not report.clean:
            log.warning("index %r reconciled after an interrupted run: %s", self.name, report)
        self.last_reconcile = report
        return report

    @staticmethod
    def _file_mtime(path: Path) -> float | None:
        try:
            return path.stat().st_mtime_ns / 1e9
        except FileNotFoundError:
            return None

    def reload_if_changed(self) -> bool:
        """Read-only indexes: reload the FAISS file if a writer checkpointed since. True if so."""
        if not self.read_only:
            return False
        mtime = self._file_mtime(self.vectors_path)
        if mtime is None or mtime == self._vectors_mtime:
            return False
        fresh = VectorStore.open(
            self.vectors_path,
            factory=self._manifest.factory,
            mmap=self.vectors.read_only,
            use_gpu=self.vectors.on_gpu,
        )
        with self._lock:
            self.vectors = fresh
            self._vectors_mtime = mtime
        return True

    # ------------------------------------------------------------------ stats

    def stats(self) -> IndexStats:
        """Images by status, regions by state, vectors and tombstones."""
        with self.db.session() as s:
            images = {
                status: int(n)
                for status, n in s.execute(
                    select(Image.status, func.count()).group_by(Image.status)
                )
            }
            region_counts = {
                (state, bool(deleted)): int(n)
                for state, deleted, n in s.execute(
                    select(Region.vector_state, Region.deleted, func.count()).group_by(
                        Region.vector_state, Region.deleted
                    )
                )
            }
        for st in ImageStatus:
            images.setdefault(st.value, 0)
        return IndexStats(
            name=self.name,
            model=self.model,
            embedder=self.embedder,
            dimension=self.dimension,
            factory=self._manifest.factory,
            images=images,
            regions=region_counts.get((_COMMITTED, False), 0),
            regions_pending=region_counts.get((_PENDING, False), 0),
            regions_missing=region_counts.get((_MISSING, False), 0),
            regions_deleted=sum(n for (_, d), n in region_counts.items() if d),
            vectors=self.vectors.ntotal,
            vector_tombstones=self.vectors.n_tombstones,
            unflushed=len(self._unflushed_ids),
        )
