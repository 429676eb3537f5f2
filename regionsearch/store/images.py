"""Image rows: insert/update by path, lookups, status changes.

An image's status says what the indexer still owes it: 'pending' (to embed, or embedded but
not yet checkpointed), 'indexed', 'failed' (with ``error``), 'deleted' (the file is gone).
The functions taking a ``Session`` run inside a caller's transaction (the write protocol
changes images and regions atomically); :class:`ImageRepository` opens its own.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Iterator
from typing import Any

from sqlalchemy import exists, func, select
from sqlalchemy.orm import Session

from .db import Database
from .models import Image, ImageStatus, Region, VectorState
from .records import ImageRecord
from .sql import batches, bulk_update, chunks, in_list

MAX_ERROR_CHARS = 8000
_FIELDS = ("content_hash", "size_bytes", "mtime", "width", "height")


class ImageRepository:
    """Reads and writes the ``images`` table of one index database."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def upsert(self, items: Iterable[dict[str, Any]]) -> list[ImageRecord]:
        """Insert or update image rows in one transaction; returns them in input order.

        Each item has ``path`` and optionally ``content_hash``, ``size_bytes``, ``mtime``,
        ``width``, ``height``. New images are 'pending'. An existing image goes back to
        'pending' when its ``content_hash`` changes or it was 'deleted' (the file came back);
        otherwise its status is kept, so unchanged indexed images are skipped by the indexer.
        """
        items = list(items)
        out: dict[str, Image] = {}
        with self.db.session() as s:
            paths = [str(it["path"]) for it in items]
            existing: dict[str, Image] = {}
            for chunk in batches(paths):
                for row in s.scalars(select(Image).where(Image.path.in_(chunk))):
                    existing[row.path] = row
            for it in items:
                path = str(it["path"])
                row = existing.get(path) or out.get(path)
                if row is None:
                    row = Image(path=path, status=ImageStatus.PENDING.value)
                    for f in _FIELDS:
                        setattr(row, f, it.get(f))
                    s.add(row)
                else:
                    new_hash = it.get("content_hash")
                    changed = new_hash is not None and new_hash != row.content_hash
                    for f in _FIELDS:
                        if it.get(f) is not None:
                            setattr(row, f, it.get(f))
                    if changed or row.status == ImageStatus.DELETED.value:
                        row.status = ImageStatus.PENDING.value
                        row.error = None
                out[path] = row
            s.flush()
            return [ImageRecord.from_row(out[str(it["path"])]) for it in items]

    def get(self, path: str) -> ImageRecord | None:
        with self.db.session() as s:
            row = s.scalars(select(Image).where(Image.path == str(path))).first()
            return ImageRecord.from_row(row) if row else None

    def get_by_id(self, image_id: int) -> ImageRecord | None:
        with self.db.session() as s:
            row = s.get(Image, int(image_id))
            return ImageRecord.from_row(row) if row else None

    def by_paths(self, paths: Iterable[str]) -> dict[str, ImageRecord]:
        """Lookup of many paths (chunked ``IN``): ``{path: record}`` for the known ones."""
        found: dict[str, ImageRecord] = {}
        with self.db.session() as s:
            for chunk in batches([str(p) for p in paths]):
                for row in s.scalars(select(Image).where(Image.path.in_(chunk))):
                    found[row.path] = ImageRecord.from_row(row)
        return found

    def by_hash(self, content_hash: str) -> list[ImageRecord]:
        """Images with this sha256 (duplicates of one file under several paths)."""
        with self.db.session() as s:
            rows = s.scalars(
                select(Image).where(Image.content_hash == content_hash).order_by(Image.id)
            )
            return [ImageRecord.from_row(r) for r in rows]

    def iter(
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

    def set_status(
        self, image_ids: list[int], status: ImageStatus, error: str | None = None
    ) -> None:
        """Set ``status`` (and ``error``, truncated) of these images in one transaction."""
        values: dict[str, Any] = {"status": status.value}
        if status is ImageStatus.FAILED:
            values["error"] = None if error is None else str(error)[:MAX_ERROR_CHARS]
        with self.db.session() as s:
            set_status(s, image_ids, **values)

    def counts_by_status(self) -> dict[str, int]:
        """``{status: images}`` with every status present (0 when none)."""
        with self.db.session() as s:
            counts = {
                status: int(n)
                for status, n in s.execute(
                    select(Image.status, func.count()).group_by(Image.status)
                )
            }
        for st in ImageStatus:
            counts.setdefault(st.value, 0)
        return counts


def known_ids(s: Session, image_ids: list[int]) -> set[int]:
    """Which of ``image_ids`` exist."""
    known: set[int] = set()
    for chunk in chunks(image_ids):
        known.update(s.scalars(select(Image.id).where(in_list(Image.id, chunk))))
    return known


def set_status(s: Session, image_ids: list[int], **values: Any) -> int:
    """``UPDATE images SET **values WHERE id IN image_ids``; returns the rows changed."""
    n = 0
    for chunk in chunks(image_ids):
        res = s.execute(bulk_update(Image).where(in_list(Image.id, chunk)).values(**values))
        n += res.rowcount or 0
    return n


def reset_to_pending(s: Session, image_ids: list[int]) -> int:
    """Images whose vectors must be made again -> 'pending' (deleted ones stay deleted)."""
    n = 0
    for chunk in chunks(image_ids):
        res = s.execute(
            bulk_update(Image)
            .where(in_list(Image.id, chunk), Image.status != ImageStatus.DELETED.value)
            .values(status=ImageStatus.PENDING.value)
        )
        n += res.rowcount or 0
    return n


def mark_indexed(s: Session, image_ids: list[int], now: dt.datetime) -> int:
    """'indexed' for those of ``image_ids`` with no live region still pending/missing."""
    n = 0
    unfinished = exists().where(
        Region.image_id == Image.id,
        Region.deleted.is_(False),
        Region.vector_state != VectorState.COMMITTED.value,
    )
    for chunk in chunks(image_ids):
        res = s.execute(
            bulk_update(Image)
            .where(
                in_list(Image.id, chunk),
                Image.status == ImageStatus.PENDING.value,
                ~unfinished,
            )
            .values(status=ImageStatus.INDEXED.value, indexed_at=now, error=None)
        )
        n += res.rowcount or 0
    return n
