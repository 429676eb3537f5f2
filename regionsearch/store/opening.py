"""Opening an index directory: its database, writer lock, checked manifest and vector backend.

:meth:`RegionIndex.open <regionsearch.store.index.RegionIndex.open>` runs these steps in
order; whatever a failing step had acquired is released before the error propagates.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url
from sqlalchemy.exc import DatabaseError as SQLAlchemyDatabaseError

from .backend import DimensionMismatchError, VectorBackend
from .backends import DEFAULT_FILE, default_location, open_vector_backend
from .db import Database, open_database
from .errors import IndexDatabaseError, IndexNotFoundError
from .lock import acquire_writer_lock, release_writer_lock
from .manifest import VECTORS_KEY, IndexMismatchError, ManifestInfo, read_manifest_json
from .manifest_rows import load_or_create_manifest, update_manifest
from .milvus_location import without_password

DB_FILE = "regions.db"


def database_url(directory: Path, db_url: str | None, *, create: bool) -> str:
    """The given URL, or the directory's SQLite file (refusing a recorded server DB)."""
    if db_url is not None:
        return db_url
    json_copy = read_manifest_json(directory) if directory.exists() else None
    recorded = json_copy.database if json_copy else None
    if recorded and make_url(recorded).get_backend_name() != "sqlite":
        raise ValueError(
            f"index {directory.name!r} keeps its metadata in {recorded}; pass db_url= (with "
            "the password) to open it"
        )
    db_file = directory / DB_FILE
    if not create and not db_file.exists():
        raise IndexNotFoundError(
            f"no index at {directory} (no {DB_FILE}); create it first, e.g. by "
            f"indexing with --name {directory.name}"
        )
    return f"sqlite:///{db_file}"


def open_sql(
    directory: Path,
    *,
    model: str | None,
    embedder: str | None,
    dimension: int | None,
    factory: str | None,
    db_url: str | None,
    create: bool,
    read_only: bool,
    mmap: bool,
    image_root: str | None,
) -> tuple[Database, ManifestInfo, int | None]:
    """Writer lock (not for readers), database and checked manifest of ``directory``."""
    if mmap and not read_only:
        raise ValueError("mmap=True needs read_only=True (a memory-mapped index is immutable)")
    url = database_url(directory, db_url, create=create)
    if create:
        directory.mkdir(parents=True, exist_ok=True)
    elif not directory.exists():
        raise IndexNotFoundError(f"no index directory {directory}")
    lock_fd = None if read_only else acquire_writer_lock(directory)
    db: Database | None = None
    try:
        db = open_database(url)
        manifest = load_or_create_manifest(
            db,
            name=directory.name,
            model=model,
            embedder=embedder,
            dimension=dimension,
            factory=factory,
            create=create and not read_only,
            check_name=db_url is not None,
            image_root=image_root,
            location=str(directory),
        )
    except BaseException as exc:
        if db is not None:
            db.dispose()
        release_writer_lock(lock_fd)
        if isinstance(exc, SQLAlchemyDatabaseError):  # one line, not a driver traceback
            shown = make_url(url).render_as_string(hide_password=True)
            raise IndexDatabaseError(
                f"cannot read the index database {shown}: {exc.orig} (a damaged file? restore "
                "it from a backup or index again under a new --name)"
            ) from None
        raise
    return db, manifest, lock_fd


def locate_vectors(
    db: Database,
    directory: Path,
    manifest: ManifestInfo,
    asked: str | None,
    read_only: bool,
) -> str:
    """Where the vectors live: recorded in the manifest, else asked, else the default.

    A location inside ``directory`` is recorded relative to it (the index can move). A URL is
    recorded without its password (credentials never go to disk); asking for the recorded
    location with the password returns the asked one, so the backend can authenticate, and a
    recorded one alone leaves the password to the backend (an environment variable, see
    :mod:`.milvus_location`)."""
    recorded = manifest.extra.get(VECTORS_KEY)
    if recorded is not None:
        resolved = str(directory / recorded) if "://" not in recorded else recorded
        if asked is None:
            return resolved
        asked = os.fspath(asked)
        if asked in (resolved, recorded):
            return resolved
        if "://" in asked and without_password(asked) == without_password(recorded):
            return asked  # the recorded URL plus its password
        raise ValueError(
            f"index {manifest.name!r} keeps its vectors at {without_password(recorded)!r}, "
            f"not {without_password(asked)!r}"
        )
    if asked is None:
        asked = default_location(directory, manifest.factory)
        if read_only or Path(asked).name == DEFAULT_FILE:
            return asked  # the single FAISS file: the default when nothing is recorded
    asked = os.fspath(asked)
    if not read_only:
        stored = without_password(asked)
        if "://" not in asked and Path(asked).resolve().is_relative_to(directory):
            stored = str(Path(asked).resolve().relative_to(directory))
        update_manifest(db, manifest, extra={**manifest.extra, VECTORS_KEY: stored})
    return asked


def open_vectors(
    location: str,
    manifest: ManifestInfo,
    *,
    read_only: bool,
    use_gpu: bool | None,
    **options: Any,
) -> VectorBackend:
    """The backend at ``location`` (created empty if absent); vectors of another dimension
    than the manifest's are an :class:`IndexMismatchError`."""
    try:
        return open_vector_backend(
            location,
            dimension=manifest.dimension,
            factory=manifest.factory,
            read_only=read_only,
            create=True,
            use_gpu=use_gpu,
            **options,
        )
    except DimensionMismatchError as exc:
        raise IndexMismatchError(
            manifest.name,
            {"dimension": manifest.dimension},
            {},
            location=without_password(location),
            reason=f"The vectors do not match the manifest of their own index ({exc}; "
            "were they copied from another index?).",
        ) from exc
