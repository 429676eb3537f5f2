"""The read side of a region index: lookups, image filters, search, stats.

Everything here only reads SQL and the vector backend, so it is all a read-only open (an API
server next to a running indexer) needs. :class:`~regionsearch.store.index.RegionIndex` adds
opening, the write protocol, checkpoints and reconciliation on top.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from .backend import RegionFilter, VectorBackend
from .consistency import VectorSync
from .db import Database
from .filter_ops import intersect
from .filter_strategy import FilterPlan, plan_filter, post_filtered_search
from .images import ImageRepository
from .manifest import ManifestInfo
from .models import ImageStatus
from .records import ImageRecord, IndexStats, RegionRecord
from .region_filters import ImageFilter, region_filter
from .regions import COMMITTED, MISSING, PENDING, RegionRepository


class IndexReader:
    """Reads of one region index: SQL rows through the repositories, vectors through the backend
    held by ``sync`` (searches run under ``lock``, which the writer holds while it changes them).
    """

    def __init__(
        self, db: Database, manifest: ManifestInfo, sync: VectorSync, lock: threading.RLock
    ) -> None:
        self.db = db
        self._manifest = manifest
        self._sync = sync
        self._lock = lock
        self._images = ImageRepository(db)
        self._regions = RegionRepository(db)

    @property
    def vectors(self) -> VectorBackend:
        """The vector backend (search, ids, reconstruct; mutate through the index only)."""
        return self._sync.vectors

    @vectors.setter
    def vectors(self, backend: VectorBackend) -> None:
        self._sync.vectors = backend

    @property
    def name(self) -> str:
        return self._manifest.name

    @property
    def manifest(self) -> ManifestInfo:
        return self._manifest

    @property
    def embedder(self) -> str:
        return self._manifest.embedder

    @property
    def model(self) -> str:
        return self._manifest.model

    @property
    def dimension(self) -> int:
        return self._manifest.dimension

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """A SQL session in a transaction (advanced use: the models are in ``store.models``)."""
        with self.db.session() as s:
            yield s

    # ------------------------------------------------------------------ images

    def get_image(self, path: str) -> ImageRecord | None:
        return self._images.get(path)

    def get_image_by_id(self, image_id: int) -> ImageRecord | None:
        return self._images.get_by_id(image_id)

    def images_by_paths(self, paths: Iterable[str]) -> dict[str, ImageRecord]:
        """Lookup of many paths: ``{path: record}`` for the known ones."""
        return self._images.by_paths(paths)

    def images_by_hash(self, content_hash: str) -> list[ImageRecord]:
        """Images with this sha256 (duplicates of one file under several paths)."""
        return self._images.by_hash(content_hash)

    def iter_images(
        self, status: str | ImageStatus | None = None, *, batch_size: int = 1000
    ) -> Iterator[ImageRecord]:
        """All images (or those with ``status``) in id order, paged by id (no OFFSET)."""
        return self._images.iter(status, batch_size=batch_size)

    # ------------------------------------------------------------------ regions

    def regions_missing_vectors(self, limit: int | None = None) -> list[RegionRecord]:
        """Live regions whose vector was lost (state 'missing'): re-embed and ``restore_vectors``."""
        return self._regions.missing_vectors(limit)

    def fetch_regions(self, ids: Any, *, include_deleted: bool = False) -> list[RegionRecord]:
        """Regions (with their image path/size) for ``ids``, **in the order given**; unknown
        ids, ``-1`` padding and deleted regions are skipped (match results by ``record.id``)."""
        return self._regions.fetch(ids, include_deleted=include_deleted)

    def regions_of_image(self, image_id: int) -> list[RegionRecord]:
        """Live regions of one image, by id."""
        return self._regions.of_image(image_id)

    def region_ids_for_images(self, image_ids: Iterable[int]) -> np.ndarray:
        """Live region ids of these images, sorted (searches use :meth:`region_filter`)."""
        return self._regions.live_ids_of_images(image_ids)

    def region_filter(self, images: ImageFilter) -> RegionFilter:
        """The live regions of the images ``images`` allows, as a backend filter (id ranges).

        Read on a pooled Core connection (no ORM session, no COMMIT): a read-only hot path."""
        with self.db.engine.connect() as conn:
            return region_filter(conn, images, self.db.dialect)

    def plan_filter(self, images: ImageFilter) -> FilterPlan:
        """``images`` with its estimated share of the regions (a sample of image rows, no
        scan): :meth:`search` then post-filters a broad filter and pre-filters a narrow one
        (see :mod:`~regionsearch.store.filter_strategy`). Reuse the plan across the searches
        of one request: it keeps the pre-filter once built."""
        with self.db.engine.connect() as conn:
            return plan_filter(conn, images, self.db.dialect)

    # ------------------------------------------------------------------ search

    def _selector(
        self,
        image_ids: Iterable[int] | None,
        region_ids: Any,
        selector: RegionFilter | None,
        plan: FilterPlan | None = None,
    ) -> RegionFilter | None:
        """One filter from the ways of restricting a search (all must hold)."""
        if plan is not None:
            with self.db.engine.connect() as conn:
                images = plan.selector(conn, self.db.dialect)
            selector = images if selector is None else intersect(selector, images)
        if image_ids is not None:
            images = self.region_filter(ImageFilter(image_ids=list(image_ids)))
            selector = images if selector is None else intersect(selector, images)
        if region_ids is not None:
            ids = RegionFilter.from_ids(region_ids)
            selector = ids if selector is None else intersect(selector, ids)
        return selector

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        images: ImageFilter | FilterPlan | None = None,
        image_ids: Iterable[int] | None = None,
        region_ids: Any = None,
        selector: RegionFilter | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """k-NN, optionally restricted to some images / region ids / a filter: (scores, ids).

        ``images`` (a filter, or its :meth:`plan_filter`) alone is post-filtered when it is
        broad, with the pre-filter's results on an exact index. Returns raw backend results
        (ids -1 / scores -inf where fewer than k); pair them with :meth:`fetch_regions`.
        """
        plan = self.plan_filter(images) if isinstance(images, ImageFilter) else images
        alone = image_ids is None and region_ids is None and selector is None
        if plan is not None and alone and plan.candidates(int(k)) is not None:
            q = np.asarray(queries, dtype=np.float32)
            with self.db.engine.connect() as conn:
                return post_filtered_search(
                    conn,
                    self.db.dialect,
                    plan,
                    q.reshape(1, -1) if q.ndim == 1 else q,
                    k,
                    self._locked_search,
                )
        sel = self._selector(image_ids, region_ids, selector, plan)
        return self._locked_search(queries, k, sel)

    def _locked_search(
        self, queries: Any, k: int, sel: RegionFilter | None
    ) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            return self.vectors.search(queries, k, sel)

    def range_search(
        self,
        query: np.ndarray,
        threshold: float,
        *,
        image_ids: Iterable[int] | None = None,
        region_ids: Any = None,
        selector: RegionFilter | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """All regions with score >= ``threshold`` for one query: (scores, ids), best first."""
        sel = self._selector(image_ids, region_ids, selector)
        with self._lock:
            return self.vectors.range_search(query, threshold, sel)

    # ------------------------------------------------------------------ stats

    def missing_vectors(self) -> int:
        """Regions the last checkpoint recorded beyond the vectors the store holds now (a
        deleted vector folder, a partial restore); 0 when they agree. Cheap, unlike
        :meth:`stats`: the manifest's counts against the backend's, no SQL scan."""
        return max(0, self._manifest.n_regions - int(self.vectors.ntotal))

    def stats(self) -> IndexStats:
        """Images by status, regions by state, vectors and tombstones."""
        region_counts = self._regions.counts_by_state()
        return IndexStats(
            name=self.name,
            model=self.model,
            embedder=self.embedder,
            dimension=self.dimension,
            factory=self._manifest.factory,
            images=self._images.counts_by_status(),
            regions=region_counts.get((COMMITTED, False), 0),
            regions_pending=region_counts.get((PENDING, False), 0),
            regions_missing=region_counts.get((MISSING, False), 0),
            regions_deleted=sum(n for (_, d), n in region_counts.items() if d),
            vectors=self.vectors.ntotal,
            vector_tombstones=self.vectors.n_tombstones,
            unflushed=len(self._sync.unflushed_ids),
            backend=self.vectors.stats(),
        )
