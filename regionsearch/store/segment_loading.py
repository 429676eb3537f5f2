"""Background loading of big sealed segments for read-only opens.

FAISS 1.15 memory-maps flat codes and the ``Refine(SQ8)`` copy, but reads the 4-bit fast-scan
inverted lists (``BlockInvertedLists``) and their ids into memory: ~490 MB and ~1-2 s for a 10M
``IVF4096,PQ64x4fs`` segment. A reader that pays that in ``open`` cannot open in under a second,
so a read-only open starts those reads in one background thread and returns; the first call
that needs the segments (a search, ``ntotal``, ``contains``...) waits for them, so no call ever
sees a partial store. A failed load is raised, with the segment named, by every call that needs
it and by ``close``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from .segment_files import SegmentStoreError
from .segment_search import Segment

DEFAULT_LAZY_LOAD_BYTES = 64 << 20
"""Segment files at least this big load in the background on a read-only open (smaller ones
load in a few milliseconds: a thread hop would cost more than it hides)."""


class SegmentLoads:
    """The segments still loading, by name; one loader thread per backend, started on demand."""

    def __init__(self, open_segment: Callable[[str], Segment]) -> None:
        self._open_segment = open_segment
        self._executor: ThreadPoolExecutor | None = None
        self._futures: dict[str, Future[Segment]] = {}
        self._guard = threading.Lock()

    def __contains__(self, name: str) -> bool:
        return name in self._futures

    @property
    def pending(self) -> int:
        """How many segments have not finished loading (for ``stats`` and tests)."""
        return sum(1 for f in self._futures.values() if not f.done())

    @staticmethod
    def worth_it(path: Path, lazy_bytes: int | None) -> bool:
        """Whether segment file ``path`` is big enough to load in the background."""
        return lazy_bytes is not None and path.exists() and path.stat().st_size >= lazy_bytes

    def start(self, name: str) -> None:
        """Begin loading ``name`` now, in the loader thread."""
        with self._guard:
            if name in self._futures:
                return
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="segment-load")
            self._futures[name] = self._executor.submit(self._open_segment, name)

    def forget(self, keep: Iterable[str]) -> None:
        """Drop loads of segments no longer listed (a merge replaced them)."""
        keep = set(keep)
        for name in [n for n in self._futures if n not in keep]:
            self._futures.pop(name).cancel()

    def wait(self, names: Iterable[str]) -> dict[str, Segment]:
        """The loaded segments among ``names`` (waiting for them); a failed load raises."""
        done = {}
        for name in names:
            future = self._futures.get(name)
            if future is None:
                continue
            try:
                done[name] = future.result()
            except Exception as exc:  # kept: every later call that needs it raises too
                raise SegmentStoreError(f"segment {name} failed to load: {exc}") from exc
            del self._futures[name]
        return done

    def close(self) -> None:
        """Join the loader thread; raise if a load failed (after joining)."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
        failed = {
            n: f.exception() for n, f in self._futures.items() if f.done() and not f.cancelled()
        }
        self._futures.clear()
        errors = {n: e for n, e in failed.items() if e is not None}
        if errors:
            raise SegmentStoreError(f"segments failed to load: {errors}")


__all__ = ["DEFAULT_LAZY_LOAD_BYTES", "SegmentLoads"]
