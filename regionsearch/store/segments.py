"""``SegmentedFaissBackend``: FAISS vectors in immutable segments, so a checkpoint costs what was added.

The files (``segments.json``, ``seg-*.faiss``, ``tomb-*.npy``) are described in
:mod:`~regionsearch.store.segment_files`.

State in memory: the sealed segments (memory-mapped where FAISS can; a read-only open loads
big ones in a background thread, :mod:`~regionsearch.store.segment_loading`), one growing segment (an in-memory flat index of what was added since the
last commit) and each segment's tombstoned ids (hidden inside FAISS by an ``IDSelectorNot``,
never post-filtered). Tombstones belong to a segment, not to an id, so a removed id can be
added again (reconciliation restores a lost vector that way) without the old copy showing.

Segments are plain ``IndexIDMap`` with their ids sorted, not ``IndexIDMap2``: an id's position
is one ``np.searchsorted`` on the id table, while ``IDMap2`` rebuilds a hash map of every id on
each open (measured 10 ms per 200k ids here, ~0.5 s and ~0.5 GB at 10M). Search is CPU only.

Commit (cost proportional to what changed; :mod:`~regionsearch.store.segment_commit`
argues why a SIGKILL at any moment leaves the last committed state): the growing segment,
minus ids removed before they were sealed, is sorted by id and written as new segment files of at most
``segment_size`` vectors; the ids removed since the last commit go to one new tombstone
file; then ``segments.json`` is replaced. Merge: small segments (and segments with
tombstones) are rewritten into larger ones without their tombstoned vectors, in the
background (a thread the writer starts once ``merge_threshold`` small segments exist) or on
demand (:meth:`SegmentedFaissBackend.merge`, ``regionsearch compact NAME``); the heavy work
runs without the lock, only the final list swap takes it.

Readers: a read-only open takes no lock and never writes; :meth:`refresh` re-reads the small
list and opens only new segments and new tombstone files. Merged-away segments are dropped.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from . import segment_files as files
from .ann_policy import IndexChoice, choose_index, default_memory_budget, parse_memory_budget
from .backend import ReadOnlyBackendError, RegionFilter
from .segment_commit import commit_growing
from .segment_files import SegmentInfo, SegmentList, SegmentStoreError
from .segment_loading import DEFAULT_LAZY_LOAD_BYTES, SegmentLoads
from .segment_merge import Merger
from .segment_search import (
    Segment,
    Subset,
    check_knobs,
    contains_ids,
    exact_subset,
    gather_vectors,
    live_ids,
    live_positions,
    range_search_segments,
    search_segments,
    segment_selectors,
    set_knobs,
)
from .vector_checks import (
    ValidatingBackend,
    VectorValidationError,
    check_ids,
    check_new_ids,
    check_queries,
)

log = logging.getLogger(__name__)

DEFAULT_SEGMENT_SIZE = 1_000_000
DEFAULT_MAX_SEGMENT_SIZE = 1 << 24
"""Largest segment a full merge (``compact --all``) writes: 16.8M vectors, so a 10M store ends
as one segment (search cost grows with the segment count); its structure fits the budget."""
REFRESH_RETRIES = 5


class SegmentedFaissBackend(ValidatingBackend):
    """A :class:`~regionsearch.store.backend.VectorBackend` over a segment directory.

    ``segment_size``: most vectors in one committed or background-merged segment. A segment
    under ``small_fraction`` of it is *small*; ``merge_threshold`` small segments start a
    background merge (``background_merge``). ``max_segment_size``: most vectors in one segment
    of a full merge. ``memory_budget`` (bytes or text such as ``"8GB"``): what all the store's
    vectors may occupy; merged segments get structures that fit their share of it
    (``index_policy(n, d, budget_bytes)``). Given to a writer, it is recorded in the segment
    list; ``None`` keeps the recorded one, else a third of the machine's RAM at merge time.
    ``lazy_load_bytes``: a read-only open loads segment files this big in the background
    (``None``: never); ``segment_reader(directory, name)`` reads one (injectable for tests).
    """

    def __init__(
        self,
        directory: str | Path,
        dimension: int,
        *,
        read_only: bool = False,
        create: bool = True,
        segment_size: int = DEFAULT_SEGMENT_SIZE,
        small_fraction: float = 0.25,
        merge_threshold: int = 8,
        background_merge: bool = True,
        exact_filter_limit: int = 2048,
        norm_tolerance: float = 1e-2,
        index_policy: Callable[[int, int, int | None], IndexChoice] = choose_index,
        memory_budget: int | str | None = None,
        max_segment_size: int = DEFAULT_MAX_SEGMENT_SIZE,
        search_knobs: dict[str, float] | None = None,
        lazy_load_bytes: int | None = DEFAULT_LAZY_LOAD_BYTES,
        segment_reader: Callable[[Path, str], Any] = files.read_segment,
    ) -> None:
        if int(dimension) <= 0:
            raise ValueError(f"dimension must be positive, got {dimension}")
        if int(segment_size) <= 0:
            raise ValueError(f"segment_size must be positive, got {segment_size}")
        self.directory = Path(directory)
        self.dimension = int(dimension)
        self.read_only = bool(read_only)
        self.segment_size = int(segment_size)
        self.max_segment_size = max(self.segment_size, int(max_segment_size))
        self._asked_budget = parse_memory_budget(memory_budget)
        self._knobs = check_knobs(search_knobs or {})
        self.small_size = max(1, int(segment_size * small_fraction))
        self.merge_threshold = max(2, int(merge_threshold))
        self.background_merge = bool(background_merge)
        self.exact_filter_limit = int(exact_filter_limit)
        self.norm_tolerance = float(norm_tolerance)
        self.index_policy = index_policy  # (n vectors, d, budget) -> a merged segment's index
        self._lock = threading.RLock()
        self._merger = Merger(self)
        self.lazy_load_bytes = lazy_load_bytes if self.read_only else None
        self._read_segment = segment_reader
        self._loads = SegmentLoads(self._open_segment)
        self._closed = False
        self._lock_fd: int | None = None
        if not create and not (self.directory / files.LIST_FILE).exists():
            raise FileNotFoundError(f"no segment store at {self.directory} (no {files.LIST_FILE})")
        if not self.read_only:  # a reader never writes: it stays empty until a writer commits
            self.directory.mkdir(parents=True, exist_ok=True)
            self._lock_fd = files.lock_writer(self.directory)
        try:
            self._listing = SegmentList(self.dimension)
            self._segments: dict[str, Segment] = {}
            # removed ids by segment name ("growing" included), not yet physically dropped
            self._tombs: files.Tombstones = {}
            self._committed_tombs: files.Tombstones = {}
            self._next_seq = 1
            self._reset_growing()
            self._load()
        except BaseException:
            self._loads.close()
            files.unlock_writer(self._lock_fd)
            raise

    # ------------------------------------------------------------------ state

    def _reset_growing(self) -> None:
        self._growing = Segment.wrap(
            "growing", faiss.IndexIDMap(faiss.IndexFlatIP(self.dimension)), sorted_ids=False
        )

    def _load(self) -> None:
        """Read the committed list (retrying if a writer replaces it under a reader)."""
        for attempt in range(REFRESH_RETRIES):
            listing = files.read_list(self.directory)
            if listing is None:
                if self.read_only:
                    return  # empty until a writer's first commit
                listing = SegmentList(self.dimension)
                files.write_list(self.directory, listing)
            if listing.dimension != self.dimension:
                raise SegmentStoreError(
                    f"{self.directory} holds {listing.dimension}-d vectors, not {self.dimension}-d"
                )
            if not self.read_only:
                files.remove_unlisted(self.directory, listing)
                budget = self._asked_budget
                if budget is not None and budget != listing.memory_budget:  # record it
                    listing = replace(
                        listing, generation=listing.generation + 1, memory_budget=budget
                    )
                    files.write_list(self.directory, listing)
            try:
                self._adopt(listing)
                return
            except FileNotFoundError:
                if self.read_only and attempt + 1 < REFRESH_RETRIES:
                    continue  # a merge deleted a file of the list we read: read the newer one
                raise

    def _adopt(self, listing: SegmentList) -> None:
        """Make ``listing`` the state: open new segments, read new tombstone files."""
        names = [info.name for info in listing.segments]
        opened = {}
        for name in names:
            if name in self._segments:
                opened[name] = self._segments[name]
            elif self._loads.worth_it(self.directory / name, self.lazy_load_bytes):
                self._loads.start(name)
            else:
                opened[name] = self._open_segment(name)
        old = self._listing.tombstones
        if listing.tombstones[: len(old)] == old and self._listing.generation:
            new = files.read_tombstones(self.directory, listing.tombstones[len(old) :])
            committed = files.merge_tombstones(self._committed_tombs, new)
        else:  # a merge consolidated them: read them all (cost: the tombstones)
            committed = files.read_tombstones(self.directory, listing.tombstones)
        committed = {n: ids for n, ids in committed.items() if n in names}
        with self._lock:
            self._loads.forget(names)
            self._segments = opened
            self._listing = listing
            self._committed_tombs = committed
            if self.read_only:
                self._tombs = committed
            else:  # a writer's own removals since its last commit stay
                kept = {n: t for n, t in self._tombs.items() if n in names or n == "growing"}
                self._tombs = files.merge_tombstones(committed, kept)
            self._next_seq = max(self._next_seq, listing.next_seq)

    def _open_segment(self, name: str) -> Segment:
        """Open sealed segment ``name`` (knobs are set again when a background load is adopted)."""
        index = self._read_segment(self.directory, name)
        set_knobs(index, **self._knobs)
        return Segment.wrap(name, index)

    def set_search_knobs(self, **knobs: float | None) -> None:
        """Override ``nprobe``/``k_factor`` of every ANN segment, open now or later (tuning and
        benchmarks; by default each segment searches with the knobs it was merged with)."""
        with self._lock:
            self._knobs = check_knobs({**self._knobs, **knobs})
            for seg in self._segments.values():
                set_knobs(seg.index, **self._knobs)

    def _sealed(self) -> list[Segment]:
        """The listed segments, waiting for any still loading in the background."""
        names = [s.name for s in self._listing.segments]
        if any(n in self._loads for n in names):
            with self._lock:
                for name, seg in self._loads.wait(names).items():
                    set_knobs(seg.index, **self._knobs)
                    self._segments[name] = seg
        return [self._segments[n] for n in names]

    def _all_segments(self) -> list[Segment]:
        return [*self._sealed(), self._growing]

    # ------------------------------------------------------------------ properties

    @property
    def ntotal(self) -> int:  # from the list: never waits for a background load
        listed = sum(s.n for s in self._listing.segments)
        return listed + self._growing.n - self.n_tombstones

    @property
    def n_tombstones(self) -> int:
        return sum(int(ids.size) for ids in self._tombs.values())

    @property
    def on_gpu(self) -> bool:
        return False

    @property
    def memory_budget(self) -> int:
        """Bytes the store's vectors may occupy: the recorded budget, else a share of RAM."""
        return self._listing.memory_budget or self._asked_budget or default_memory_budget()

    @property
    def generation(self) -> int:
        """The committed list's generation this backend last read or wrote."""
        return self._listing.generation

    def stats(self) -> dict[str, Any]:
        sealed = self._listing.segments
        return {
            "kind": "faiss-segments",
            "path": str(self.directory),
            "dimension": self.dimension,
            "metric": "ip",
            "ntotal": self.ntotal,
            "tombstones": self.n_tombstones,
            "segments": len(sealed),
            "small_segments": sum(1 for s in sealed if s.n < self.small_size),
            "segment_factories": sorted({s.factory for s in sealed}),
            "growing": self._growing.n,
            "generation": self._listing.generation,
            "memory_budget": self.memory_budget,
            "read_only": self.read_only,
            "gpu": False,
        }

    def __repr__(self) -> str:
        return (
            f"SegmentedFaissBackend({str(self.directory)!r}, d={self.dimension}, "
            f"ntotal={self.ntotal}, segments={len(self._listing.segments)})"
        )

    # ------------------------------------------------------------------ validation

    def _check_writable(self) -> None:
        if self.read_only:
            raise ReadOnlyBackendError(
                f"segment store {self.directory} was opened read-only; open it writable "
                "(read_only=False) to modify it"
            )
        if self._closed:
            raise SegmentStoreError(f"segment store {self.directory} is closed")

    # ------------------------------------------------------------------ ids

    def contains(self, ids: Any) -> np.ndarray:
        ids = check_ids(ids)
        with self._lock:
            return contains_ids(self._all_segments(), self._tombs, ids)

    def ids(self) -> np.ndarray:
        with self._lock:
            return live_ids(self._all_segments(), self._tombs)

    def reconstruct(self, ids: Any) -> np.ndarray:
        ids = check_ids(ids)
        with self._lock:
            return gather_vectors(self._all_segments(), self._tombs, ids, self.dimension)

    # ------------------------------------------------------------------ mutation

    def add(self, ids: Any, vectors: Any, image_ids: Any = None) -> None:
        """Add to the growing segment (durable at :meth:`commit`). ``image_ids`` is ignored:
        filters use id ranges."""
        self._check_writable()
        ids = check_new_ids(ids)
        vectors = self.validate_vectors(vectors, n=ids.size)
        if ids.size == 0:
            return
        with self._lock:
            clash = ids[self.contains(ids)]
            if clash.size:
                raise VectorValidationError(f"ids already in the index: {clash[:5].tolist()}")
            growing = self._growing
            dead = self._tombs.get("growing")
            if dead is not None and np.isin(ids, dead).any():  # re-added before a commit
                growing.index.remove_ids(faiss.IDSelectorBatch(dead))
                del self._tombs["growing"]
            growing.index.add_with_ids(vectors, ids)
            self._growing = Segment.wrap("growing", growing.index, sorted_ids=False)

    def remove(self, ids: Any) -> int:
        """Tombstone ``ids`` (hidden at once, durable at :meth:`commit`); absent ones ignored.
        A removed id may be added again (the reconciliation of a lost vector does)."""
        self._check_writable()
        ids = np.unique(check_ids(ids))
        gone = 0
        with self._lock:
            for seg in self._all_segments():
                if not seg.n:
                    continue
                live = ids[live_positions(seg, self._tombs, ids)[0]]
                if live.size:
                    self._tombs = files.merge_tombstones(self._tombs, {seg.name: live})
                    gone += int(live.size)
        return gone

    def commit(self) -> None:
        """Seal the growing segment and record new tombstones, then swap the list."""
        self._check_writable()
        with self._lock:
            commit_growing(self)
        if self.background_merge:
            self._merger.start_if_due()

    def _write_segment(self, seq: int, index: Any, factory: str) -> SegmentInfo:
        name = files.write_segment(self.directory, seq, index)
        ids = Segment.wrap(name, index).ids
        return SegmentInfo(name, int(index.ntotal), int(ids[0]), int(ids[-1]), factory)

    # ------------------------------------------------------------------ search

    def _segment_selectors(self, selector: RegionFilter | None) -> list[tuple[Segment, Any, Any]]:
        return segment_selectors(self._all_segments(), self._tombs, selector)

    def _exact_subset(self, selector: RegionFilter | None) -> Subset:
        segments, limit = self._all_segments(), self.exact_filter_limit
        return exact_subset(segments, self._tombs, selector, limit, self.dimension)

    def search(
        self, queries: Any, k: int, selector: RegionFilter | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """k nearest by inner product over every segment (per-segment FAISS, merged top-k)."""
        q = check_queries(queries, self.dimension)
        k = int(k)
        if k <= 0:
            raise ValueError("k must be positive")
        with self._lock:
            subset = self._exact_subset(selector)
            return search_segments(self._segment_selectors(selector), q, k, selector, subset)

    def range_search(
        self, query: Any, threshold: float, selector: RegionFilter | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Every vector with score >= ``threshold`` for one query, best first."""
        q = check_queries(query, self.dimension)
        if q.shape[0] != 1:
            raise VectorValidationError("range_search takes one query")
        with self._lock:
            subset = self._exact_subset(selector)
            parts = self._segment_selectors(selector)
            return range_search_segments(parts, q, threshold, selector, subset)

    # ------------------------------------------------------------------ readers

    def refresh(self) -> bool:
        """Pick up a writer's commits: new segments and tombstone files only."""
        if not self.read_only or self._closed:
            return False
        for attempt in range(REFRESH_RETRIES):
            listing = files.read_list(self.directory)
            if listing is None or listing.generation == self._listing.generation:
                return False
            try:
                self._adopt(listing)
                return True
            except FileNotFoundError:
                if attempt + 1 == REFRESH_RETRIES:
                    raise
        return False

    def close(self) -> None:
        """Stop a background merge (its output is discarded if unlisted) and release the lock."""
        if self._closed:
            return
        self._merger.close()
        self._closed = True
        try:
            self._loads.close()
        finally:
            files.unlock_writer(self._lock_fd)
            self._lock_fd = None

    # ------------------------------------------------------------------ merging

    def merge(self, everything: bool = False) -> int:
        """Merge small segments (``everything``: all of them) and drop tombstoned vectors now;
        waits for a running background merge first. Returns how many segments were rewritten."""
        self._check_writable()
        return self._merger.run_now(everything)

    def _allocate_seq(self, count: int = 1) -> int:
        with self._lock:
            seq = max(self._next_seq, self._listing.next_seq)
            self._next_seq = seq + count
            return seq


def open_segments(
    location: str,
    *,
    dimension: int,
    factory: str | None,
    read_only: bool,
    create: bool,
    use_gpu: bool | None = None,
    **options: Any,
) -> SegmentedFaissBackend:
    """Opener for ``store/backends.py``: a segment directory (``*.segments``).

    ``factory`` must be exact (``None``, ``Flat``, ``IDMap2,Flat``): segments choose their
    own structure by size (``store/ann_policy.py``). ``mmap`` is accepted and implied."""
    if factory and factory.replace(" ", "") not in ("Flat", "IDMap2,Flat", "IDMap,Flat"):
        raise ValueError(
            f"a segment store picks each segment's index by size (store/ann_policy.py); "
            f"factory {factory!r} needs the single-file FAISS backend (a *.faiss location)"
        )
    options.pop("mmap", None)
    if use_gpu:
        log.warning("the segment store searches on the CPU (use_gpu=%r ignored)", use_gpu)
    return SegmentedFaissBackend(location, dimension, read_only=read_only, create=create, **options)


__all__ = ["DEFAULT_SEGMENT_SIZE", "SegmentedFaissBackend", "open_segments"]
