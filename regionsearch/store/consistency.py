"""The SQL/vector consistency protocol: write order, checkpoints, reconciliation.

SQL is the authority on *what exists*; the vector backend is the authority on *which vectors
are durable*. Every region row carries ``vector_state`` (``pending`` / ``committed`` /
``missing``) and a ``deleted`` tombstone. Ids come from the database and are never reused.

Write order (``add_images_regions`` then a checkpoint)::

    W1  SQL transaction: tombstone the image's previous regions (deleted=true), insert the new
        region rows with vector_state='pending' (this allocates their ids), image status
        'pending'; COMMIT.
    W2  backend (in memory): remove the old ids, add the new vectors under the new ids.
    C1  checkpoint: ``backend.commit()`` (durable, atomic: a crash leaves the previous commit).
    C2  SQL transaction: rows added since the last checkpoint -> 'committed'; their images ->
        'indexed' (when none of their live regions is still pending/missing); manifest counts;
        COMMIT.

Deletes: SQL tombstone first (COMMIT), then backend remove, durable at the next checkpoint.
Search results are always joined with SQL, which drops tombstoned rows, so a deleted region
never shows even before its vector is gone.

Reconciliation (every writable open; also ``reconcile()``), F = live ids in the backend::

    R1  pending rows of an image whose vectors are *all* in F (crash between C1 and C2)
        -> promoted to 'committed', image 'indexed';
    R2  other pending rows (crash before C1) -> deleted, their images back to 'pending';
    R3  ids in F without a live committed row (orphans: rows deleted or dropped in R2)
        -> removed from the backend;
    R4  live committed rows whose id is not in F (vectors lost/older) -> 'missing', their
        images back to 'pending' (re-embed: ``restore_vectors`` or re-index the image);
    R5  the backend is committed before returning.

Why ``kill -9`` anywhere is safe: before C1 the backend's durable state is the previous
checkpoint and every row added since is 'pending' (R2 drops them, R3 drops any stray vector);
between C1 and C2 the backend holds every pending vector (R1 keeps the work); a crash inside a
SQL transaction rolls it back; a commit is atomic; ids are never reused, so a stale vector id
cannot name a different region. Re-running reconciliation is idempotent.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import numpy as np
from sqlalchemy import select

from . import images as images_sql
from . import regions as regions_sql
from .backend import VectorBackend
from .db import Database
from .manifest import ManifestInfo
from .manifest_rows import update_counts
from .models import ImageStatus, Region, utcnow
from .records import NewRegion, ReconcileReport
from .regions import COMMITTED, MISSING, PENDING, RegionRepository
from .sql import chunks, in_list

#: One image's regions and their vectors, validated.
Prepared = tuple[int, list[NewRegion], np.ndarray]


class VectorSync:
    """Keeps SQL rows and backend vectors consistent for one writer (see module docstring).

    Holds what was added since the last checkpoint; every method runs under ``lock``.
    """

    def __init__(
        self,
        db: Database,
        vectors: VectorBackend,
        manifest: ManifestInfo,
        lock: threading.RLock,
    ) -> None:
        self.db = db
        self.vectors = vectors
        self.manifest = manifest
        self.lock = lock
        self.unflushed_ids: list[int] = []
        self.unflushed_images: set[int] = set()
        self.counts_stale = False  # SQL changed since the last checkpoint
        self.last_checkpoint = time.monotonic()

    # ------------------------------------------------------------------ writes (W1, W2)

    def add_images_regions(self, prepared: Sequence[Prepared], replace: bool) -> list[np.ndarray]:
        """W1 then W2 for a batch of images; returns the new region ids per image."""
        image_ids = [p[0] for p in prepared]
        with self.lock:
            now = utcnow()
            old_ids: list[int] = []
            with self.db.session() as s:  # W1: rows first (ids from the database), 'pending'
                known = images_sql.known_ids(s, image_ids)
                unknown = [i for i in image_ids if i not in known]
                if unknown:
                    raise KeyError(f"unknown image ids {unknown[:5]} (upsert_image first)")
                if replace:
                    old_ids = regions_sql.tombstone_regions_of(s, image_ids)
                ids_per_image = regions_sql.insert_pending(
                    s, [(p[0], p[1]) for p in prepared], self.manifest.embedder
                )
                with_regions = [
                    i for i, ids in zip(image_ids, ids_per_image, strict=True) if ids.size
                ]
                without = [
                    i for i, ids in zip(image_ids, ids_per_image, strict=True) if not ids.size
                ]
                images_sql.set_status(s, with_regions, status=ImageStatus.PENDING.value, error=None)
                images_sql.set_status(  # nothing to make durable: done now
                    s, without, status=ImageStatus.INDEXED.value, error=None, indexed_at=now
                )
            self.counts_stale = True
            if old_ids:  # W2: the backend, in memory
                self.vectors.remove(np.asarray(old_ids, dtype=np.int64))
            all_ids = np.concatenate(ids_per_image) if ids_per_image else np.empty(0, np.int64)
            if all_ids.size:
                all_vecs = np.concatenate([p[2] for p in prepared], axis=0)
                owners = np.repeat(image_ids, [ids.size for ids in ids_per_image])
                try:
                    self.vectors.add(all_ids, all_vecs, image_ids=owners.astype(np.int64))
                except BaseException:
                    RegionRepository(self.db).drop_pending(all_ids.tolist())
                    raise
                self.unflushed_ids.extend(all_ids.tolist())
                self.unflushed_images.update(with_regions)
            return ids_per_image

    def delete_regions_of(self, image_ids: list[int]) -> int:
        """SQL tombstones (COMMIT), then the backend remove; returns the regions removed."""
        with self.lock:
            with self.db.session() as s:
                region_ids = regions_sql.tombstone_regions_of(s, image_ids)
            if region_ids:
                self.vectors.remove(np.asarray(region_ids, dtype=np.int64))
                self.counts_stale = True
            return len(region_ids)

    def restore_vectors(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """'missing' rows -> 'pending' with their re-computed vectors (durable at C1/C2)."""
        with self.lock:
            with self.db.session() as s:
                rows = []
                for chunk in chunks(ids.tolist()):
                    rows += list(
                        s.execute(
                            select(Region.id, Region.image_id).where(
                                in_list(Region.id, chunk),
                                Region.vector_state == MISSING,
                                Region.deleted.is_(False),
                            )
                        )
                    )
                if len(rows) != ids.size:
                    found = {r.id for r in rows}
                    bad = [i for i in ids.tolist() if i not in found][:5]
                    raise KeyError(f"regions {bad} are not live regions with a missing vector")
                regions_sql.set_state(s, ids.tolist(), PENDING)
            owners = np.asarray([int(r.image_id) for r in rows], dtype=np.int64)
            by_id = dict(zip([int(r.id) for r in rows], owners.tolist(), strict=True))
            self.vectors.add(ids, vectors, image_ids=np.asarray([by_id[int(i)] for i in ids]))
            self.unflushed_ids.extend(ids.tolist())
            self.unflushed_images.update(by_id.values())

    def forget_images(self, image_ids: Sequence[int]) -> None:
        """Images failed or deleted since they were staged: nothing of theirs to complete."""
        self.unflushed_images.difference_update(int(i) for i in image_ids)
        self.counts_stale = True

    # ------------------------------------------------------------------ checkpoint (C1, C2)

    def due(self, every_s: float | None, every_vectors: int | None) -> bool:
        """Whether an automatic checkpoint is due (count or age of the unflushed work)."""
        n = len(self.unflushed_ids)
        if not n:
            return False
        by_count = bool(every_vectors) and n >= int(every_vectors or 0)
        by_time = every_s is not None and time.monotonic() - self.last_checkpoint >= every_s
        return by_count or by_time

    def commit_vectors(self) -> None:
        """C1: the backend makes every add and remove so far durable."""
        self.vectors.commit()

    @property
    def sql_behind(self) -> bool:
        """Whether C2 has anything to record."""
        return bool(self.unflushed_ids or self.unflushed_images or self.counts_stale)

    def commit_rows(self) -> None:
        """C2: rows staged since the last checkpoint -> 'committed', images 'indexed', counts."""
        images = sorted(self.unflushed_images)
        with self.db.session() as s:
            regions_sql.set_state(s, self.unflushed_ids, COMMITTED, only_from=PENDING)
            images_sql.mark_indexed(s, images, utcnow())
            update_counts(s, self.manifest, self.vectors.ntotal)
        self.unflushed_ids = []
        self.unflushed_images = set()
        self.counts_stale = False

    def checkpointed(self) -> None:
        self.last_checkpoint = time.monotonic()

    # ------------------------------------------------------------------ reconcile (R1-R5)

    def reconcile(self) -> ReconcileReport:
        """Repair SQL/vector disagreements left by a crash (R1-R5, module docstring)."""
        report = ReconcileReport()
        with self.lock:
            durable = self.vectors.ids()  # F
            with self.db.session() as s:
                committed = np.fromiter(
                    s.scalars(
                        select(Region.id).where(
                            Region.vector_state == COMMITTED, Region.deleted.is_(False)
                        )
                    ),
                    dtype=np.int64,
                )
                pending = s.execute(
                    select(Region.id, Region.image_id, Region.deleted).where(
                        Region.vector_state == PENDING
                    )
                ).all()
                live = [r for r in pending if not r.deleted]
                durable_mask = self.vectors.contains(np.asarray([r.id for r in live], np.int64))
                by_image: dict[int, list[tuple[int, bool]]] = {}
                for r, ok in zip(live, durable_mask.tolist(), strict=True):
                    by_image.setdefault(int(r.image_id), []).append((int(r.id), ok))
                promote: list[int] = []
                drop = [int(r.id) for r in pending if r.deleted]  # tombstoned before C1
                promoted_images: list[int] = []
                reset_images: set[int] = set()
                for iid, entries in by_image.items():
                    if all(ok for _, ok in entries):  # R1
                        promote += [rid for rid, _ in entries]
                        promoted_images.append(iid)
                    else:  # R2
                        drop += [rid for rid, _ in entries]
                        reset_images.add(iid)
                keep = np.union1d(committed, np.asarray(promote, dtype=np.int64))
                orphans = np.setdiff1d(durable, keep)  # R3
                missing = np.setdiff1d(committed, durable)  # R4
                regions_sql.set_state(s, promote, COMMITTED)
                regions_sql.delete_rows(s, drop)
                reset_images.update(regions_sql.image_ids_of(s, missing.tolist()))
                regions_sql.set_state(s, missing.tolist(), MISSING)
                report.images_reset = images_sql.reset_to_pending(s, sorted(reset_images))
                report.images_indexed = images_sql.mark_indexed(s, promoted_images, utcnow())
                report.promoted = len(promote)
                report.pending_dropped = len(drop)
                report.missing_marked = int(missing.size)
            if orphans.size:
                report.orphans_removed = self.vectors.remove(orphans)
            self.vectors.commit()  # R5
            with self.db.session() as s:
                update_counts(s, self.manifest, self.vectors.ntotal)
        return report
