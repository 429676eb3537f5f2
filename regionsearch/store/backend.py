"""The contract between the region index and a vector engine.

:class:`~regionsearch.store.index.RegionIndex` keeps metadata in SQL and vectors in a
:class:`VectorBackend`; it uses exactly the members below and nothing else, so a new engine
(FAISS segments on one machine, a Milvus collection on many) is one class that passes
``tests/test_vector_backend_contract.py``.

Conventions every implementation keeps:

- vectors are float32, L2-normalised, compared by inner product; ids are the SQL region ids
  (int64, positive, never reused); bad vectors, ids or queries raise ``ValueError`` naming
  the problem;
- ``add`` then ``commit`` makes vectors durable: after a crash, every id committed is found and
  no id that was not added is. Between commits nothing is promised (the SQL side re-adds what
  is missing: see ``RegionIndex.reconcile``). A commit costs what changed since the last one;
- ``remove`` hides ids from every read at once (a tombstone), durable at the next ``commit``;
- ``search`` returns ``(scores, ids)`` of shape ``(nq, k)``, best first; empty slots hold id
  ``-1`` and score ``-inf``. A :class:`RegionFilter` restricts candidates *inside* the engine
  (a pre-filter: a filter never cuts results below ``k`` when ``k`` allowed ids exist);
- a read-only backend raises :class:`ReadOnlyBackendError` on mutation and sees a writer's
  commits after ``refresh()``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from regionsearch.errors import RegionSearchError


class ReadOnlyBackendError(RegionSearchError, RuntimeError):
    """A mutation (``add``, ``remove``, ``commit``) of a backend opened read-only."""


class DimensionMismatchError(RegionSearchError, ValueError):
    """The location holds vectors of another dimension than the one asked for."""


@dataclass(frozen=True)
class RegionFilter:
    """Which region ids a search may return, in a form engines can apply in bulk.

    ``id_ranges`` is an ``(n, 2)`` int64 array of half-open ``[start, stop)`` ranges (the regions
    of one image get contiguous ids, so an image filter is at most one range per image, read
    from the image rows and merged where adjacent). ``image_ids`` names the same images for engines that store the image id as a
    scalar field and filter on it (Milvus). ``ids`` lists extra single ids (allowed in addition
    to the ranges). An empty filter allows nothing.
    """

    id_ranges: np.ndarray
    image_ids: np.ndarray | None = None
    ids: np.ndarray | None = None

    @staticmethod
    def from_ids(ids: Any) -> RegionFilter:
        """A filter allowing exactly ``ids`` (for callers that already hold a list)."""
        arr = np.unique(np.asarray(ids, dtype=np.int64).ravel())
        return RegionFilter(id_ranges=np.empty((0, 2), np.int64), ids=arr)

    def allows(self, ids: Any) -> np.ndarray:
        """Boolean mask of which ``ids`` pass (the reference semantics, for tests and fallbacks)."""
        arr = np.asarray(ids, dtype=np.int64)
        mask = np.zeros(arr.shape, dtype=bool)
        ranges = np.asarray(self.id_ranges, dtype=np.int64).reshape(-1, 2)
        if ranges.size:
            order = np.argsort(ranges[:, 0], kind="stable")
            starts, stops = ranges[order, 0], ranges[order, 1]
            # for overlapping ranges, the running max of stops is what a point must be under
            reach = np.maximum.accumulate(stops)
            pos = np.searchsorted(starts, arr, side="right") - 1
            ok = pos >= 0
            mask[ok] = arr[ok] < reach[pos[ok]]
        if self.ids is not None and len(self.ids):
            mask |= np.isin(arr, self.ids)
        return mask

    @property
    def is_empty(self) -> bool:
        """Whether the filter allows no id at all."""
        ranges = np.asarray(self.id_ranges).reshape(-1, 2)
        no_ranges = not ranges.size or bool(np.all(ranges[:, 1] <= ranges[:, 0]))
        return no_ranges and (self.ids is None or len(self.ids) == 0)


@runtime_checkable
class VectorBackend(Protocol):
    """What :class:`RegionIndex` needs from a vector engine (see the module docstring)."""

    dimension: int
    read_only: bool

    @property
    def ntotal(self) -> int:
        """Live vectors (tombstoned ones excluded)."""
        ...

    @property
    def n_tombstones(self) -> int:
        """Removed ids not yet physically dropped."""
        ...

    @property
    def on_gpu(self) -> bool:
        """Whether searches run on a GPU."""
        ...

    def validate_vectors(self, vectors: Any, n: int | None = None) -> np.ndarray:
        """``vectors`` as C-contiguous float32 ``(n, dimension)``; raise a clear error if not."""
        ...

    def add(self, ids: Any, vectors: Any, image_ids: Any = None) -> None:
        """Add vectors under region ``ids`` (``image_ids``: the owning image of each, optional)."""
        ...

    def remove(self, ids: Any) -> int:
        """Tombstone ``ids``; return how many were present."""
        ...

    def contains(self, ids: Any) -> np.ndarray:
        """Boolean mask: which ``ids`` are live."""
        ...

    def ids(self) -> np.ndarray:
        """All live ids (sorted int64)."""
        ...

    def reconstruct(self, ids: Any) -> np.ndarray:
        """The stored vectors of ``ids`` (KeyError naming a missing id)."""
        ...

    def search(
        self, queries: Any, k: int, selector: RegionFilter | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """k nearest by inner product: ``(scores (nq, k) float32, ids (nq, k) int64)``."""
        ...

    def range_search(
        self, query: Any, threshold: float, selector: RegionFilter | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Every vector with score >= ``threshold`` for one query: ``(scores, ids)``, best first."""
        ...

    def commit(self) -> None:
        """Make every add and remove so far durable (cost: what changed since the last commit)."""
        ...

    def refresh(self) -> bool:
        """Reader side: pick up a writer's commits; True if anything changed."""
        ...

    def close(self) -> None:
        """Release files, handles and connections (idempotent)."""
        ...

    def stats(self) -> dict[str, Any]:
        """Engine facts for ``regionsearch stats`` (kind, vectors, segments, index type, ...)."""
        ...
