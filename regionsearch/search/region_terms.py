"""The score terms of a search that need the regions' stored vectors, not only FAISS's scores.

FAISS returns each candidate's (calibrated) inner product. Two result switches also read the
candidate's vector: the open-set term (the candidate against the calibration bank) and the
repeated-stuff term (the candidate against the other regions of its image; see
:mod:`regionsearch.search.postprocess`). Both are never positive, so FAISS's score stays an
upper bound and the searcher's over-fetch stays exact. One :class:`RegionTerms` serves one
search: it reads each candidate's vector once and each candidate image's regions once.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from regionsearch.search.postprocess import (
    ResultOptions,
    mask_cover,
    open_set_penalty,
    repetition_penalty,
    repetition_scores,
)
from regionsearch.store import RegionRecord
from regionsearch.store.models import VectorState


class RepetitionCache:
    """Repetition scores of the regions of recently searched images, by image (bounded LRU).

    The repetition of a region does not depend on the query, so a searcher keeps it between
    searches. An entry is used only if it knows every region asked for; an image indexed again
    gets new region ids, so its stale entry is recomputed, never read. Thread-safe (a server's
    requests share one searcher).
    """

    def __init__(self, max_images: int = 20_000) -> None:
        self.max_images = max_images
        self._entries: OrderedDict[tuple[int, int], dict[int, float]] = OrderedDict()
        self._lock = threading.Lock()

    def get(
        self, image_id: int, neighbours: int, region_ids: Iterable[int]
    ) -> dict[int, float] | None:
        with self._lock:
            entry = self._entries.get((image_id, neighbours))
            if entry is None or any(i not in entry for i in region_ids):
                return None
            self._entries.move_to_end((image_id, neighbours))
            return entry

    def put(self, image_id: int, neighbours: int, entry: dict[int, float]) -> None:
        with self._lock:
            self._entries[(image_id, neighbours)] = entry
            self._entries.move_to_end((image_id, neighbours))
            while len(self._entries) > self.max_images:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


class RegionTerms:
    """Open-set plus repeated-stuff terms of the candidates of one search.

    ``index`` is the :class:`~regionsearch.store.RegionIndex` searched; ``query`` the
    uncalibrated unit query vector (the open-set term reads raw cosines); ``bank`` returns the
    ``(B, d)`` calibration bank (called only when the open-set term is on); ``cache`` keeps
    repetition scores between searches (``None``: this search only).
    """

    def __init__(
        self,
        index: Any,
        query: np.ndarray,
        results: ResultOptions,
        bank: Callable[[], np.ndarray],
        cache: RepetitionCache | None = None,
    ) -> None:
        self.index = index
        self.query = np.asarray(query, dtype=np.float32).ravel()
        self.results = results
        self.bank = bank
        self.cache = cache if cache is not None else RepetitionCache()

    @property
    def active(self) -> bool:
        return bool(self.results.open_set or self.results.repetition)

    def __call__(self, regions: Sequence[RegionRecord]) -> dict[int, float]:
        """The summed terms of ``regions``, by region id."""
        ids = [r.id for r in regions]
        terms = np.zeros(len(ids), dtype=np.float64)
        if self.results.open_set and ids:
            vectors = self.index.vectors.reconstruct(np.asarray(ids, dtype=np.int64))
            terms += open_set_penalty(
                vectors @ self.query,
                vectors @ self.bank().T,
                self.results.open_set_tau,
                self.results.open_set,
            )
        if self.results.repetition and ids:
            repetition = self.repetition(regions)
            terms += repetition_penalty([repetition[i] for i in ids], self.results)
        return dict(zip(ids, terms.tolist(), strict=True))

    def repetition(self, regions: Sequence[RegionRecord]) -> dict[int, float]:
        """Repetition scores of ``regions``, from the cache or from every region of their
        images (a region's look-alikes need not be candidates of this query)."""
        neighbours = self.results.repetition_neighbours
        asked: dict[int, list[int]] = defaultdict(list)
        for r in regions:
            asked[r.image_id].append(r.id)
        out: dict[int, float] = {}
        missing = []
        for image, ids in asked.items():
            entry = self.cache.get(image, neighbours, ids)
            if entry is None:
                missing.append(image)
            else:
                out.update((i, entry[i]) for i in ids)
        for image, entry in self._compute(missing).items():
            self.cache.put(image, neighbours, entry)
            out.update((i, entry.get(i, -1.0)) for i in asked[image])
        return out

    def _compute(self, image_ids: list[int]) -> dict[int, dict[int, float]]:
        """Repetition of every region with a stored vector of these images (two SQL reads and
        one vector read for all of them)."""
        if not image_ids:
            return {}
        committed = VectorState.COMMITTED.value
        by_image: dict[int, list[RegionRecord]] = defaultdict(list)
        ids = self.index.region_ids_for_images(image_ids)
        for r in self.index.fetch_regions(ids):
            if r.vector_state == committed:
                by_image[r.image_id].append(r)
        out: dict[int, dict[int, float]] = {image: {} for image in image_ids}
        if not by_image:
            return out
        stored = np.asarray([r.id for rows in by_image.values() for r in rows], np.int64)
        vectors = self.index.vectors.reconstruct(stored)
        start = 0
        for image, rows in by_image.items():
            scores = repetition_scores(
                vectors[start : start + len(rows)],
                mask_cover([r.rle for r in rows]),
                self.results.repetition_neighbours,
            )
            start += len(rows)
            out[image] = dict(zip([r.id for r in rows], scores.tolist(), strict=True))
        return out
