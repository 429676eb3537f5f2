"""Merging segments: which to merge, and rewriting them into one without tombstoned vectors.

A merge reads its sources (memory-mapped, immutable) and builds its output without holding
the backend's lock, so searches and commits go on meanwhile; only the final list swap
(:meth:`SegmentedFaissBackend._install_merge`) takes it. The output gets a new file number and
counts only once the list names it: a crash or a ``close()`` mid-merge leaves the sources
listed and the output file unlisted (deleted by the next writer). Large outputs use the
structure the backend's ``index_policy`` picks for their size and their share of the store's
memory budget (:func:`~regionsearch.store.ann_policy.choose_index` by default): a segment of
``n`` vectors in a store of ``N`` may occupy ``budget * n / N`` bytes.

A merge streams: the sources stay memory-mapped, a compressed structure is trained on a
random sample (``IndexChoice.train_size`` vectors), and the output is filled ``MERGE_CHUNK``
vectors at a time, so its memory is the output's own codes plus one chunk (at 10M regions,
d=512, a few GB of codes, never the 20 GB of float vectors).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import faiss
import numpy as np

from . import segment_files as files
from .ann_policy import IndexChoice
from .segment_files import SegmentInfo, SegmentStoreError
from .segment_search import Segment

if TYPE_CHECKING:
    from .segments import SegmentedFaissBackend

log = logging.getLogger(__name__)

MERGE_CHUNK = 65_536
NO_IDS = np.empty(0, np.int64)
TOMBSTONE_REWRITE_FRACTION = 0.1
"""A segment whose tombstoned share exceeds this is rewritten by an ordinary merge too."""


def merge_limit(backend: SegmentedFaissBackend, everything: bool) -> int:
    """Most vectors in one output: a full merge makes few large segments (search cost grows
    with their count), a background merge of small ones stops at ``segment_size``."""
    return backend.max_segment_size if everything else backend.segment_size


def plan_merges(backend: SegmentedFaissBackend, *, everything: bool) -> list[list[str]]:
    """Groups of segment names to merge (each group's live vectors fit one segment)."""
    limit = merge_limit(backend, everything)
    candidates = []
    for info in sorted(backend._listing.segments, key=lambda s: s.min_id):
        dead = int(backend._committed_tombs.get(info.name, np.empty(0)).size)
        holey = dead > TOMBSTONE_REWRITE_FRACTION * info.n
        if everything or info.n < backend.small_size or holey:
            # a lone segment is worth rewriting to drop its tombstones, or (full merge) to
            # get the structure the policy now picks for it (a store that grew past exact)
            stale = everything and info.factory != policy_choice(backend, info.n - dead).factory
            candidates.append((info, info.n - dead, dead > 0 or stale))
    plans: list[list[str]] = []
    group: list[tuple[SegmentInfo, int, bool]] = []
    size = 0
    for cand in candidates:
        if group and size + cand[1] > limit:
            plans.append(group)
            group, size = [], 0
        group.append(cand)
        size += cand[1]
    if group:
        plans.append(group)
    return [[c[0].name for c in g] for g in plans if len(g) > 1 or g[0][2]]


def policy_choice(backend: SegmentedFaissBackend, n: int) -> IndexChoice:
    """The structure of a merged segment of ``n`` vectors: the policy's for its size and its
    share of the budget (``budget * n / N`` bytes in a store of ``N`` vectors)."""
    share = backend.memory_budget * n // max(backend.ntotal, n, 1)
    return backend.index_policy(n, backend.dimension, share)


def build_index(dimension: int, choice: IndexChoice, sample: np.ndarray | None) -> Any:
    """An empty ``IndexIDMap`` of ``choice``'s structure, trained on ``sample`` if it needs it."""
    if choice.exact:
        return faiss.IndexIDMap(faiss.IndexFlatIP(dimension))
    inner = faiss.index_factory(dimension, choice.factory, faiss.METRIC_INNER_PRODUCT)
    if not inner.is_trained:
        inner.train(sample)
    params = faiss.ParameterSpace()
    if choice.nprobe is not None:
        params.set_index_parameter(inner, "nprobe", int(choice.nprobe))
    if choice.ef_search is not None:
        params.set_index_parameter(inner, "efSearch", int(choice.ef_search))
    if choice.k_factor is not None:
        refine = faiss.downcast_index(inner)
        if isinstance(refine, faiss.IndexRefine):
            refine.k_factor = float(choice.k_factor)
    return faiss.IndexIDMap(inner)


class _Sources:
    """The live vectors of the merge sources, addressable in global id order."""

    def __init__(self, segments: list[Segment], tombs: files.Tombstones) -> None:
        self.segments = segments
        ids = np.concatenate([s.ids for s in segments])
        which = np.repeat(np.arange(len(segments)), [s.n for s in segments])
        pos = np.concatenate([np.arange(s.n, dtype=np.int64) for s in segments])
        live = np.concatenate(
            [
                ~np.isin(s.ids, tombs[s.name]) if s.name in tombs else np.ones(s.n, bool)
                for s in segments
            ]
        )
        order = np.argsort(ids[live], kind="stable")
        self.ids = ids[live][order]
        self.which = which[live][order]
        self.pos = pos[live][order]

    def vectors(self, start: int, stop: int) -> np.ndarray:
        """Vectors of the live ids ``[start, stop)`` (in id order)."""
        return self._gather(np.arange(start, stop))

    def sample(self, start: int, stop: int, n: int, seed: int = 0) -> np.ndarray:
        """Up to ``n`` vectors drawn at random from ``[start, stop)`` (training points)."""
        rng = np.random.default_rng(seed)
        picks = rng.choice(np.arange(start, stop), size=min(n, stop - start), replace=False)
        return self._gather(np.sort(picks))

    def _gather(self, picks: np.ndarray) -> np.ndarray:
        which, pos = self.which[picks], self.pos[picks]
        out = np.empty((picks.size, self.segments[0].index.d), np.float32)
        for i, seg in enumerate(self.segments):
            rows = np.flatnonzero(which == i)
            if rows.size:
                out[rows] = seg.vectors(pos[rows])
        return out


def merge_segments(
    backend: SegmentedFaissBackend, names: list[str], stop: threading.Event, limit: int
) -> bool:
    """Rewrite the segments ``names`` as new ones of at most ``limit`` vectors without
    tombstoned vectors, each structured for its share of the budget; False if stopped."""
    with backend._lock:
        listed = {s.name for s in backend._listing.segments}
        if not set(names) <= listed:
            return False
        segments = [backend._segments[n] for n in names]
        for seg in segments:
            seg.vectors(np.empty(0, np.int64))  # build IVF direct maps while holding the lock
        tombs = {n: backend._committed_tombs[n] for n in names if n in backend._committed_tombs}
    sources = _Sources(segments, tombs)
    outputs: list[SegmentInfo] = []
    d = backend.dimension
    for start in range(0, max(sources.ids.size, 1), limit):
        stop_at = min(start + limit, sources.ids.size)
        if stop_at <= start:
            break
        n_out = stop_at - start
        with backend._lock:
            choice = policy_choice(backend, n_out)
        log.info("merging %d vectors into %s", n_out, choice.factory)
        sample = None
        if not choice.exact:
            sample = sources.sample(start, stop_at, max(choice.train_size, 1))
        index = build_index(d, choice, sample)
        for lo in range(start, stop_at, MERGE_CHUNK):
            if stop.is_set():
                return False
            hi = min(lo + MERGE_CHUNK, stop_at)
            index.add_with_ids(sources.vectors(lo, hi), sources.ids[lo:hi].copy())
        if stop.is_set():
            return False
        seq = backend._allocate_seq()
        outputs.append(backend._write_segment(seq, index, choice.factory))
    install_merge(backend, names, outputs, tombs)
    return True


def install_merge(
    backend: SegmentedFaissBackend,
    sources: list[str],
    outputs: list[SegmentInfo],
    dropped: files.Tombstones,
) -> None:
    """Swap ``sources`` for ``outputs`` in the list (the merge's commit point), under the lock.

    ``dropped``: the sources' tombstones the merge applied. Tombstones that came later (while
    it ran) name ids the outputs still hold: they move to the output holding each id. The
    tombstones are rewritten as one file (cost: the tombstones); the sources' files are
    deleted once the list is durable.
    """
    with backend._lock:
        if backend._closed:
            return
        listing = backend._listing
        if not set(sources) <= {s.name for s in listing.segments}:  # pragma: no cover
            raise SegmentStoreError("merge sources changed under the merge (two mergers?)")
        opened = [backend._open_segment(o.name) for o in outputs]

        def moved(tombs: files.Tombstones) -> files.Tombstones:
            """``tombs`` with the sources' late tombstones re-keyed to the outputs."""
            out = {n: ids for n, ids in tombs.items() if n not in sources}
            late = [np.setdiff1d(tombs[n], dropped.get(n, NO_IDS)) for n in sources if n in tombs]
            late_ids = np.concatenate(late) if late else NO_IDS
            for seg in opened:
                hit = late_ids[seg.positions(late_ids)[0]]
                if hit.size:
                    out = files.merge_tombstones(out, {seg.name: hit})
            return out

        committed = moved(backend._committed_tombs)
        tomb_names = []
        if committed:
            seq = backend._allocate_seq()
            tomb_names.append(files.write_tombstones(backend.directory, seq, committed))
        new = replace(
            listing,
            generation=listing.generation + 1,
            next_seq=backend._next_seq,
            segments=[s for s in listing.segments if s.name not in sources] + outputs,
            tombstones=tomb_names,
        )
        files.write_list(backend.directory, new)  # the commit point
        segments = {n: s for n, s in backend._segments.items() if n not in sources}
        segments.update({seg.name: seg for seg in opened})
        backend._listing = new
        backend._segments = segments
        backend._committed_tombs = committed
        backend._tombs = moved(backend._tombs)
        files.remove_unlisted(backend.directory, new)


class Merger:
    """Runs merges for one writer: on demand, or in one background thread at a time."""

    def __init__(self, backend: SegmentedFaissBackend) -> None:
        self.backend = backend
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def due(self) -> bool:
        """Whether enough small segments piled up for a background merge."""
        b = self.backend
        small = sum(1 for s in b._listing.segments if s.n < b.small_size)
        return small >= b.merge_threshold

    def run_now(self, everything: bool) -> int:
        """Merge now (after any running background merge); segments rewritten."""
        self.wait()
        with self.backend._lock:
            plans = plan_merges(self.backend, everything=everything)
        limit = merge_limit(self.backend, everything)
        return sum(len(p) for p in plans if merge_segments(self.backend, p, self.stop, limit))

    def start_if_due(self) -> None:
        """Start a background merge when one is due and none runs."""
        if (self.thread is not None and self.thread.is_alive()) or not self.due():
            return
        with self.backend._lock:
            plans = plan_merges(self.backend, everything=False)
        self.thread = threading.Thread(
            target=self._run, args=(plans,), name="segment-merge", daemon=True
        )
        self.thread.start()

    def _run(self, plans: list[list[str]]) -> None:
        try:
            for plan in plans:
                limit = merge_limit(self.backend, False)
                if self.stop.is_set() or not merge_segments(self.backend, plan, self.stop, limit):
                    return
        except Exception:  # a failed merge leaves the old segments listed and valid
            log.exception("background merge of %s failed", self.backend.directory)

    def wait(self) -> None:
        thread = self.thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def close(self) -> None:
        """Ask a running merge to stop (its output stays unlisted) and wait for it."""
        self.stop.set()
        self.wait()
