"""SQLAlchemy models of one region index: images, regions and the index manifest.

The schema is created and upgraded only by Alembic (``regionsearch/store/migrations``); these
classes must stay in step with the newest revision there (``tests/test_store_index.py`` compares
them).

Conventions
-----------
- ``Image.path`` is stored exactly as the indexer hands it over. The indexer stores POSIX-style
  paths *relative to the indexed photo root* (recorded in ``Manifest.image_root``) so that an index
  survives moving the photo folder; absolute paths are accepted for files outside any root.
  Paths are unique.
- ``Region.id`` is the FAISS id of the region's vector (``IndexIDMap2``). Ids come from the
  database (SQLite ``AUTOINCREMENT`` / PostgreSQL identity sequence), are allocated by inserting
  the row *before* the vector is added, and are never reused, even after rows are purged. That is
  what makes a stale FAISS id harmless: it can never point at a different region.
- ``Region.rle`` is a COCO RLE of the full-image mask, ``{"size": [H, W], "counts": str}``
  (column-major runs, ``counts`` decoded from bytes). ``bbox_*`` is COCO ``[x, y, w, h]`` in pixels.
- ``Region.vector_state`` drives the SQL/FAISS consistency protocol (see ``store/index.py``):
  ``pending`` (row written, vector not yet durable), ``committed`` (vector durable in the FAISS
  file), ``missing`` (reconciliation found no vector: re-embed it).
- ``Region.deleted`` is a tombstone: deleted rows are never returned, their vectors are removed
  from (or hidden in) FAISS, and their ids are never handed out again.
- ``Image.region_id_start`` / ``region_id_end`` / ``live_regions`` summarise the image's live
  regions: every live id lies in ``[start, end)`` and there are ``live_regions`` of them, so the
  span is exact (one id range for image filters) when ``live_regions == end - start``. Written in
  the same transaction as the regions (``store/regions.py``); NULL/0 when none is live.
"""

from __future__ import annotations

import datetime as dt
import enum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    false,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

SCHEMA_VERSION = 3
"""Bumped with every Alembic revision that changes the schema (recorded in the manifest)."""

# Primary/foreign keys: 64-bit everywhere (FAISS ids are int64), but SQLite only auto-assigns
# ids for a column declared exactly ``INTEGER PRIMARY KEY`` (already 64-bit there).
ID = BigInteger().with_variant(Integer(), "sqlite")

# Deterministic constraint names so that migrations (including SQLite batch mode) can refer to them.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class ImageStatus(str, enum.Enum):
    """Lifecycle of an image row (stored as its string value)."""

    PENDING = "pending"  # new, changed, or interrupted: (re)process it
    INDEXED = "indexed"  # all its regions have durable vectors
    FAILED = "failed"  # processing raised; ``Image.error`` says why
    DELETED = "deleted"  # the file is gone; its regions are tombstoned


class VectorState(str, enum.Enum):
    """Where a region's vector stands with respect to the FAISS file on disk."""

    PENDING = "pending"
    COMMITTED = "committed"
    MISSING = "missing"


REGION_SOURCES = ("proposal", "coco", "png", "sam", "sam2", "full-image")
"""Documented values of ``Region.source`` (other short strings are accepted)."""

METRIC_IP = "ip"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Image(Base):
    __tablename__ = "images"
    __table_args__ = (
        CheckConstraint(
            "status IN ('pending', 'indexed', 'failed', 'deleted')", name="status_valid"
        ),
    )

    id: Mapped[int] = mapped_column(ID, primary_key=True, autoincrement=True)
    path: Mapped[str] = mapped_column(String(4096), unique=True)
    content_hash: Mapped[str | None] = mapped_column(String(64), index=True)  # sha256 hex
    size_bytes: Mapped[int | None] = mapped_column(BigInteger)
    mtime: Mapped[float | None] = mapped_column(Float)  # st_mtime, seconds since the epoch
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(
        String(16), default=ImageStatus.PENDING.value, server_default="pending", index=True
    )
    error: Mapped[str | None] = mapped_column(Text)
    indexed_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, server_default=func.current_timestamp()
    )
    # span of the live region ids (migration 0003): image filters read ranges from here
    region_id_start: Mapped[int | None] = mapped_column(BigInteger)
    region_id_end: Mapped[int | None] = mapped_column(BigInteger)
    live_regions: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")

    regions: Mapped[list[Region]] = relationship(back_populates="image", passive_deletes=True)

    def __repr__(self) -> str:
        return f"Image(id={self.id!r}, path={self.path!r}, status={self.status!r})"


class Region(Base):
    __tablename__ = "regions"
    __table_args__ = (
        CheckConstraint(
            "vector_state IN ('pending', 'committed', 'missing')", name="vector_state_valid"
        ),
        Index("ix_regions_vector_state_deleted", "vector_state", "deleted"),
        # the live ids of one image from this index alone: spans on image rows (0002, 0003)
        Index("ix_regions_image_live", "image_id", "deleted", "id"),
        # ``sqlite_autoincrement``: never reuse an id, even the highest one after a delete.
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(ID, primary_key=True, autoincrement=True)
    image_id: Mapped[int] = mapped_column(ID, ForeignKey("images.id", ondelete="CASCADE"))
    rle: Mapped[dict[str, Any]] = mapped_column(JSON)
    bbox_x: Mapped[float] = mapped_column(Float)
    bbox_y: Mapped[float] = mapped_column(Float)
    bbox_w: Mapped[float] = mapped_column(Float)
    bbox_h: Mapped[float] = mapped_column(Float)
    area: Mapped[float] = mapped_column(Float)  # mask pixels
    source: Mapped[str] = mapped_column(String(32))
    source_score: Mapped[float | None] = mapped_column(Float)
    category: Mapped[str | None] = mapped_column(String(255))
    external_id: Mapped[str | None] = mapped_column(String(255))  # e.g. COCO annotation id
    embedder: Mapped[str] = mapped_column(String(255))
    vector_state: Mapped[str] = mapped_column(
        String(16), default=VectorState.PENDING.value, server_default="pending"
    )
    deleted: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    created_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, server_default=func.current_timestamp()
    )

    image: Mapped[Image] = relationship(back_populates="regions")

    def __repr__(self) -> str:
        return (
            f"Region(id={self.id!r}, image_id={self.image_id!r}, source={self.source!r}, "
            f"vector_state={self.vector_state!r}, deleted={self.deleted!r})"
        )


class Manifest(Base):
    """One row: what the vectors of this index are (the identity checked on every open)."""

    __tablename__ = "manifest"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255))
    model: Mapped[str] = mapped_column(String(255))
    embedder: Mapped[str] = mapped_column(String(255))
    dimension: Mapped[int] = mapped_column(Integer)
    metric: Mapped[str] = mapped_column(String(16), default=METRIC_IP, server_default=METRIC_IP)
    factory: Mapped[str] = mapped_column(String(255))
    schema_version: Mapped[int] = mapped_column(Integer, default=SCHEMA_VERSION)
    image_root: Mapped[str | None] = mapped_column(String(4096))
    n_images: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    n_regions: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    n_vectors: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    extra: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, server_default=func.current_timestamp()
    )
    updated_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, server_default=func.current_timestamp()
    )

    def __repr__(self) -> str:
        return (
            f"Manifest(name={self.name!r}, model={self.model!r}, embedder={self.embedder!r}, "
            f"dimension={self.dimension!r}, factory={self.factory!r})"
        )
