"""Checkpoint, open and refresh cost of the segmented FAISS store, against the single-file store.

Issue 12: a single-file checkpoint rewrites every vector (3.6-18 s at 1M; ~20 GB at 10M, d=512).
A segmented checkpoint writes what was added. This measures, at each stored size:

- ``commit`` time for ``added`` new vectors (1k, 10k, 100k) on top of ``stored`` ones: it should
  grow with ``added`` and stay flat in ``stored``;
- read-only open time (memory-mapped: the list and the id tables, never the vectors) and the
  resident memory it adds;
- a reader's ``refresh`` after a writer's 10k-vector commit (opens only the new segment);
- for reference, one ``VectorStore.save`` of the same vectors as a single file (what a
  checkpoint cost before; skipped above ``--legacy-max``).

Vectors are slices of one block of random unit vectors under fresh ids (content does not
change what a write costs, and generating 10M x 512 normals would dominate the run). Exact
flat segments of ``--segment-size`` vectors, one FAISS thread, page cache warm (no root to
drop it). Each time is the median of ``--repeats`` runs; exact search is timed up to
``--search-max`` stored vectors (beyond, one scan reads more than the page cache holds).

    nice -n 10 python benchmarks/segments_checkpoint.py --sizes 100000 1000000
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe

from regionsearch.store.segments import SegmentedFaissBackend
from regionsearch.store.vectors import VectorStore

RESULTS = Path(__file__).resolve().parent / "results" / "segments_checkpoint.json"
CHUNK = 250_000
_BLOCKS: dict[int, np.ndarray] = {}


def unit_vectors(n: int, d: int, seed: int) -> np.ndarray:
    """``n`` unit vectors: a slice (starting at ``seed``) of one cached random block."""
    if d not in _BLOCKS:
        rng = np.random.default_rng(0)
        block = rng.standard_normal((CHUNK, d), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        _BLOCKS[d] = block
    block = _BLOCKS[d]
    start = seed % CHUNK
    rows = (start + np.arange(n)) % CHUNK
    return block[rows] if n + start > CHUNK else block[start : start + n]


def median_time(fn: Callable[[], object], repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def fill(
    backend: SegmentedFaissBackend, n: int, d: int, next_id: int, commit_times: list[float]
) -> int:
    """Add and commit ``n`` vectors in chunks (one commit per segment, each timed)."""
    for start in range(0, n, CHUNK):
        m = min(CHUNK, n - start)
        backend.add(np.arange(next_id, next_id + m, dtype=np.int64), unit_vectors(m, d, next_id))
        next_id += m
        if (start + m) % backend.segment_size == 0 or start + m == n:
            t0 = time.perf_counter()
            backend.commit()
            commit_times.append(time.perf_counter() - t0)
    return next_id


def measure_size(directory: Path, stored: int, args: argparse.Namespace) -> dict:
    d = args.dimension
    writer = SegmentedFaissBackend(
        directory, d, segment_size=args.segment_size, background_merge=False
    )
    t0 = time.perf_counter()
    fill_commits: list[float] = []
    next_id = fill(writer, stored, d, 1, fill_commits)
    row: dict = {
        "stored": stored,
        "segments": len(writer._listing.segments),
        "build_s": time.perf_counter() - t0,
        # commit i seals one segment on top of i segments already stored
        "build_commit_s": fill_commits,
    }
    print(f"  built {stored:,}: commits {[round(t, 2) for t in fill_commits]} s")

    commits = {}
    for added in args.added:
        batches = [unit_vectors(added, d, 10_000_000 + r) for r in range(args.repeats)]
        times = []
        for batch in batches:
            writer.add(np.arange(next_id, next_id + added, dtype=np.int64), batch)
            next_id += added
            t0 = time.perf_counter()
            writer.commit()
            times.append(time.perf_counter() - t0)
        commits[str(added)] = {"median_s": statistics.median(times), "runs_s": times}
        print(
            f"  stored {stored:>9,}  commit of {added:>7,} added: {statistics.median(times):.3f} s"
        )
    row["commit"] = commits

    removed = np.arange(1, 1 + 1000, dtype=np.int64)
    writer.remove(removed)
    t0 = time.perf_counter()
    writer.commit()
    row["commit_1000_removals_s"] = time.perf_counter() - t0

    def open_reader() -> SegmentedFaissBackend:
        return SegmentedFaissBackend(directory, d, read_only=True)

    rss0 = rss_mb()
    reader = open_reader()
    row["open_rss_added_mb"] = rss_mb() - rss0
    row["open_read_only_s"], row["open_runs_s"] = median_time(
        lambda: open_reader().close(), args.repeats
    )
    print(f"  stored {stored:>9,}  read-only open: {row['open_read_only_s'] * 1000:.1f} ms")

    refresh_times = []
    for r in range(args.repeats):
        writer.add(
            np.arange(next_id, next_id + 10_000, dtype=np.int64), unit_vectors(10_000, d, 7 + r)
        )
        next_id += 10_000
        writer.commit()
        t0 = time.perf_counter()
        changed = reader.refresh()
        refresh_times.append(time.perf_counter() - t0)
        assert changed
    row["refresh_after_10k_commit_s"] = statistics.median(refresh_times)
    print(f"  stored {stored:>9,}  refresh: {row['refresh_after_10k_commit_s'] * 1000:.1f} ms")

    if stored <= args.search_max:
        q = unit_vectors(1, d, 99)
        row["search_k10_exact_s"], _ = median_time(lambda: reader.search(q, 10), args.repeats)
    reader.close()
    writer.close()
    t0 = time.perf_counter()
    SegmentedFaissBackend(directory, d).close()
    row["open_writable_s"] = time.perf_counter() - t0
    row["bytes_on_disk"] = sum(p.stat().st_size for p in directory.iterdir())
    return row


def legacy_save(directory: Path, stored: int, d: int) -> float:
    """One single-file checkpoint of ``stored`` vectors (``VectorStore.save``)."""
    store = VectorStore(d)
    for start in range(0, stored, CHUNK):
        m = min(CHUNK, stored - start)
        store.add(
            np.arange(start + 1, start + m + 1, dtype=np.int64), unit_vectors(m, d, start + 1)
        )
    t0 = time.perf_counter()
    store.save(directory / "vectors.faiss")
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--added", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--dimension", type=int, default=512)
    parser.add_argument("--segment-size", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--legacy-max", type=int, default=1_000_000)
    parser.add_argument("--search-max", type=int, default=1_000_000)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    faiss.omp_set_num_threads(1)

    rows = []
    for stored in args.sizes:
        work = Path(tempfile.mkdtemp(prefix="segbench-", dir=args.workdir))
        try:
            print(f"stored {stored:,} (d={args.dimension})")
            row = measure_size(work / "vectors.segments", stored, args)
            if stored <= args.legacy_max:
                row["legacy_single_file_save_s"] = legacy_save(work, stored, args.dimension)
                print(f"  single-file save of {stored:,}: {row['legacy_single_file_save_s']:.2f} s")
            rows.append(row)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    result = {
        "benchmark": "segments_checkpoint",
        "machine": describe() + " (shared with other jobs; page cache warm; nice 10)",
        "faiss": faiss.__version__,
        "dimension": args.dimension,
        "segment_size": args.segment_size,
        "repeats": args.repeats,
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
