"""The plain records a region index takes and returns (no ORM objects leave the store)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from .models import Image


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

    def validated(self) -> NewRegion:
        """This region with a canonical RLE (``counts`` as str) and float fields; ValueError
        naming the field when something is not what the store keeps."""
        rle = self.rle
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
        if len(self.bbox) != 4:
            raise ValueError("region.bbox must be (x, y, w, h)")
        if not self.source or len(self.source) > 32:
            raise ValueError("region.source must be a short non-empty string (e.g. 'proposal')")
        return NewRegion(
            rle=rle,
            bbox=tuple(float(v) for v in self.bbox),  # type: ignore[arg-type]
            area=float(self.area),
            source=self.source,
            source_score=None if self.source_score is None else float(self.source_score),
            category=self.category,
            external_id=None if self.external_id is None else str(self.external_id),
        )


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
    """What ``reconcile()`` repaired (all zero: SQL and the vectors agreed)."""

    promoted: int = 0  # pending rows whose vectors were durable -> committed
    pending_dropped: int = 0  # pending rows without durable vectors -> deleted
    orphans_removed: int = 0  # vector ids without a live committed row -> removed
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
    vectors: int = 0  # live vectors in the backend (in memory)
    vector_tombstones: int = 0  # vectors hidden, awaiting compaction/rebuild
    unflushed: int = 0  # vectors added since the last checkpoint
    backend: dict[str, Any] = field(default_factory=dict)  # the vector backend's stats()
