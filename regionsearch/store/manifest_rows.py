"""The manifest row in SQL: created with the index, checked on open, counts kept current.

:mod:`regionsearch.store.manifest` defines what a manifest says and how it is checked; this
module reads and writes the one ``manifest`` row of an index database.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from .db import Database
from .errors import IndexNotFoundError
from .manifest import IndexMismatchError, ManifestInfo, check_manifest
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

log = logging.getLogger(__name__)


def manifest_row(s: Session) -> Manifest | None:
    """The manifest row (the first one: a database holds one index)."""
    return s.scalars(select(Manifest).order_by(Manifest.id).limit(1)).first()


def load_or_create_manifest(
    db: Database,
    *,
    name: str,
    model: str | None,
    embedder: str | None,
    dimension: int | None,
    factory: str | None,
    create: bool,
    check_name: bool,
    image_root: str | None,
    location: str,
) -> ManifestInfo:
    """The index's manifest, checked against what the caller asked for (``None``: anything);
    with ``create``, a new one when the database holds none (factory strings are stored
    normalised, see :func:`~regionsearch.store.faiss_util.normalize_factory`)."""
    from .faiss_util import DEFAULT_FACTORY, normalize_factory

    safe_url = db.url.render_as_string(hide_password=True)
    with db.session() as s:
        row = manifest_row(s)
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
                location=location,
            )
            if image_root is not None and row.image_root != image_root:
                row.image_root = image_root
            if row.schema_version != SCHEMA_VERSION:
                row.schema_version = SCHEMA_VERSION
        return ManifestInfo.from_row(row, database=safe_url)


def update_manifest(db: Database, info: ManifestInfo, **values: Any) -> None:
    """Set manifest columns (``image_root``, ``extra``...) in SQL and in ``info``."""
    with db.session() as s:
        row = manifest_row(s)
        for key, value in values.items():
            setattr(row, key, value)
    for key, value in values.items():
        setattr(info, key, value)


def update_counts(s: Session, info: ManifestInfo, n_vectors: int) -> None:
    """Recount indexed images and committed regions into the row and ``info``."""
    row = manifest_row(s)
    assert row is not None  # an open index always has its manifest
    row.n_images = s.scalar(
        select(func.count()).select_from(Image).where(Image.status == ImageStatus.INDEXED.value)
    )
    row.n_regions = s.scalar(
        select(func.count())
        .select_from(Region)
        .where(Region.vector_state == VectorState.COMMITTED.value, Region.deleted.is_(False))
    )
    row.n_vectors = int(n_vectors)
    row.updated_at = utcnow()
    s.flush()
    info.n_images = int(row.n_images or 0)
    info.n_regions = int(row.n_regions or 0)
    info.n_vectors = int(row.n_vectors or 0)
    info.updated_at = row.updated_at.isoformat()
