"""The score terms of a search that need the regions' stored vectors, not only FAISS's scores.

FAISS returns each candidate's (calibrated) inner product. Two result switches also read the
candidate's vector: the open-set term (the candidate against the calibration bank) and the
repeated-stuff term (the candidate against the other regions of its image; see
:mod:`regionsearch.search.postprocess`). Both are never positive, so FAISS's score stays an
upper bound and the searcher's over-fetch stays exact. One :class:`RegionTerms` serves one
search: it reads each candidate's vector once and each candidate image's regions once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from regionsearch.search.mask_relations import MaskRelations
from regionsearch.search.postprocess import (
    ResultOptions,
    open_set_penalty,
    repetition_penalty,
    repetition_scores,
)
from regionsearch.store import RegionRecord


class RegionTerms:
    """Open-set plus repeated-stuff terms of the candidates of one search.

    ``index`` is the :class:`~regionsearch.store.RegionIndex` searched; ``query`` the
    uncalibrated unit query vector (the open-set term reads raw cosines); ``bank`` returns the
    ``(B, d)`` calibration bank (called only when the open-set term is on); ``relations`` gives
    the masks of every region of a candidate's image (a region's look-alikes need not be
    candidates of this query); repetition scores are kept in its entries between searches.
    """

    def __init__(
        self,
        index: Any,
        query: np.ndarray,
        results: ResultOptions,
        bank: Callable[[], np.ndarray],
        relations: MaskRelations,
    ) -> None:
        self.index = index
        self.query = np.asarray(query, dtype=np.float32).ravel()
        self.results = results
        self.bank = bank
        self.relations = relations

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
            terms += repetition_penalty(repetition, self.results)
        return dict(zip(ids, terms.tolist(), strict=True))

    def repetition(self, regions: Sequence[RegionRecord]) -> np.ndarray:
        """Repetition scores of ``regions`` (computed once per image and neighbour count)."""
        neighbours = self.results.repetition_neighbours
        entries = self.relations.of(regions)
        for entry in entries.values():
            if neighbours not in entry.repetition:
                vectors = self.index.vectors.reconstruct(entry.ids)
                entry.repetition[neighbours] = repetition_scores(vectors, entry.cover(), neighbours)
        return np.asarray(
            [
                entries[r.image_id].repetition[neighbours][entries[r.image_id].row_of[r.id]]
                for r in regions
            ]
        )
