"""The search-process side of ``store_scale.py``: what a fresh process measures on a built index.

Kept apart from the build/compact/truth driver so each file has one job: ``store_scale.py`` runs
this in a subprocess (``--search-dir``) so the memory it reports is what a server would hold.
Also the names both sides share: the synthetic image paths and the path filters a user types.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from realistic_vectors import recall_at_k

from regionsearch.store import ImageFilter, RegionIndex

FOLDER_SIZE = (
    1000  # images a folder: paths are photos/FFFFF/imgNNNNNNNN.jpg (see ``store_scale.build``)
)
IMAGE_IDS = "bench_image_ids.npy"


def image_path(number: int) -> str:
    return f"photos/{number // FOLDER_SIZE:05d}/img{number:08d}.jpg"


def path_filters(n_images: int) -> dict[str, tuple[ImageFilter, np.ndarray]]:
    """Filters a user types, by name: (the filter, which image numbers it matches)."""
    number = np.arange(n_images)
    out = {
        "glob_every_other": (ImageFilter(path_glob="photos/*/img*[02468].jpg"), number % 2 == 0),
        "folder_all": (ImageFilter(folder="photos"), np.ones(n_images, bool)),
    }
    half = -(-n_images // FOLDER_SIZE) // 2
    digits = len(str(half)) - 1
    if half >= 1 and half == 10**digits:  # folders 0..half-1 share a prefix
        prefix = "photos/" + "0" * (5 - digits)
        f = ImageFilter(folder=prefix) if half == 1 else ImageFilter(path_glob=prefix + "*")
        out["first_half_folders"] = (f, number // FOLDER_SIZE < half)
    return out


def pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 3)


def memory_kib() -> dict[str, int]:
    """VmRSS, VmHWM (peak), RssAnon (heap) and RssFile (mapped file pages) of this process, KiB."""
    out = {}
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(("VmRSS", "VmHWM", "RssAnon", "RssFile")):
                out[line.split(":")[0]] = int(line.split()[1])
    return out


def search_phase(directory: Path, args: Any) -> dict[str, Any]:
    """Run in a fresh process: open, query, filter, memory (see the module docstring)."""
    import faiss

    faiss.omp_set_num_threads(args.threads)
    q = np.load(directory / "bench_queries.npy")
    truth = np.load(directory / "bench_truth.npy")
    half = np.load(directory / "bench_half_images.npy")
    half_truth = np.load(directory / "bench_half_truth.npy")
    k = truth.shape[1]
    before = memory_kib()
    t0, c0, p0 = time.perf_counter(), time.thread_time(), time.process_time()
    index = RegionIndex.open(directory, read_only=True, mmap=args.mmap)
    open_s, open_cpu_s = time.perf_counter() - t0, time.thread_time() - c0
    open_process_cpu_s = time.process_time() - p0
    after_open = memory_kib()
    clocks = (time.perf_counter, time.thread_time)  # wall; CPU of this thread (FAISS: 1 thread)
    try:
        t1 = time.perf_counter()
        index.fetch_regions(index.search(q[0][None], k)[1][0])  # waits for background loads
        first = {
            "first_query_ms": round((time.perf_counter() - t1) * 1000, 1),
            "open_to_first_result_s": round(time.perf_counter() - t0, 3),
            "open_to_first_result_process_cpu_s": round(time.process_time() - p0, 3),
        }
        found: list[np.ndarray] = []
        total_ms: tuple[list[float], list[float]] = ([], [])
        search_ms: tuple[list[float], list[float]] = ([], [])
        fetch_ms: tuple[list[float], list[float]] = ([], [])
        for rep in range(args.repeats):
            for vec in q:
                t1 = [c() for c in clocks]
                _, ids = index.search(vec[None], k)
                t2 = [c() for c in clocks]
                records = index.fetch_regions(ids[0])
                t3 = [c() for c in clocks]
                assert len(records) == k, "fewer hits than k"
                if rep == 0:
                    found.append(ids[0])
                for j in range(2):
                    total_ms[j].append((t3[j] - t1[j]) * 1000)
                    search_ms[j].append((t2[j] - t1[j]) * 1000)
                    fetch_ms[j].append((t3[j] - t2[j]) * 1000)
        fq = q[: args.filter_queries]
        explicit = filtered_latency(index, fq, half_truth, {"image_ids": half})
        paths = {}
        for name, (image_filter, _) in path_filters(len(np.load(directory / IMAGE_IDS))).items():
            saved = directory / f"bench_{name}_truth.npy"
            truth_f = np.load(saved) if saved.exists() else None
            paths[name] = {
                "filter": {f: v for f, v in vars(image_filter).items() if v is not None},
                **filtered_latency(index, fq, truth_f, {"images": image_filter}),
            }
        memory_after_queries = memory_kib()
        knobs = knob_sweep(index, q[: args.sweep_queries], truth, k) if args.sweep else []
    finally:
        index.close()
    return {
        "open_s": round(open_s, 3),
        "open_cpu_s": round(open_cpu_s, 3),
        "open_process_cpu_s": round(open_process_cpu_s, 3),
        **first,
        "open_mmap": args.mmap,
        "queries": len(q),
        "repeats": args.repeats,
        "recall@10_text": round(recall_at_k(np.array(found), truth), 4),
        "p50_ms": pct(total_ms[0], 50),
        "p95_ms": pct(total_ms[0], 95),
        # each pass over the queries: the first pages the mapped codes in, later ones are warm
        "p95_ms_by_pass": [
            pct(total_ms[0][i * len(q) : (i + 1) * len(q)], 95) for i in range(args.repeats)
        ],
        "search_p95_ms": pct(search_ms[0], 95),
        "sql_fetch_p95_ms": pct(fetch_ms[0], 95),
        "cpu_p50_ms": pct(total_ms[1], 50),
        "cpu_p95_ms": pct(total_ms[1], 95),
        "search_cpu_p95_ms": pct(search_ms[1], 95),
        "sql_fetch_cpu_p95_ms": pct(fetch_ms[1], 95),
        "half_images_filter": {"images": len(half), **explicit},  # ids listed explicitly
        "path_filters": paths,
        "knob_sweep": knobs,
        "rss_mib": {
            "before_open": before.get("VmRSS", 0) // 1024,
            "after_open": after_open.get("VmRSS", 0) // 1024,
            "after_queries": memory_after_queries.get("VmRSS", 0) // 1024,
            "peak_after_queries": memory_after_queries.get("VmHWM", 0) // 1024,
            "anon_after_queries": memory_after_queries.get("RssAnon", 0) // 1024,
            "file_after_queries": memory_after_queries.get("RssFile", 0) // 1024,
            "peak_after_sweep": memory_kib().get("VmHWM", 0) // 1024,
        },
    }


def filtered_latency(
    index: Any, q: np.ndarray, truth: np.ndarray | None, how: dict[str, Any]
) -> dict[str, Any]:
    """Filtered search + SQL fetch of the hits (``search(..., **how)``): latency and recall."""
    clocks = (time.perf_counter, time.thread_time)
    found: list[np.ndarray] = []
    ms: tuple[list[float], list[float]] = ([], [])
    for vec in q:
        t1 = [c() for c in clocks]
        _, ids = index.search(vec[None], truth.shape[1] if truth is not None else 10, **how)
        index.fetch_regions(ids[0])
        for j in range(2):
            ms[j].append((clocks[j]() - t1[j]) * 1000)
        found.append(ids[0])
    recall = None if truth is None else round(recall_at_k(np.array(found), truth[: len(q)]), 4)
    return {
        "queries": len(q),
        "p50_ms": pct(ms[0], 50),
        "p95_ms": pct(ms[0], 95),
        "cpu_p50_ms": pct(ms[1], 50),
        "cpu_p95_ms": pct(ms[1], 95),
        "recall@10": recall,
    }


KNOBS = [(64, 128), (128, 64), (128, 128), (128, 256), (256, 128), (256, 256)]


def knob_sweep(index: Any, q: np.ndarray, truth: np.ndarray, k: int) -> list[dict[str, Any]]:
    """Recall and search CPU time (no SQL) of the ANN segments at other (nprobe, k_factor):
    the curve that sets ann_policy's defaults. Run last: the knobs stay set."""
    backend = index.vectors
    if not hasattr(backend, "set_search_knobs") or backend.stats().get("segment_factories") in (
        None,
        ["Flat"],
    ):
        return []
    out = []
    for nprobe, k_factor in KNOBS:
        backend.set_search_knobs(nprobe=nprobe, k_factor=k_factor)
        found, cpu = [], []
        for vec in q:
            c0 = time.thread_time()
            found.append(index.search(vec[None], k)[1][0])
            cpu.append((time.thread_time() - c0) * 1000)
        out.append(
            {
                "nprobe": nprobe,
                "k_factor": k_factor,
                "recall@10_text": round(recall_at_k(np.array(found), truth[: len(q)]), 4),
                "search_cpu_p50_ms": pct(cpu, 50),
                "search_cpu_p95_ms": pct(cpu, 95),
            }
        )
        print(json.dumps(out[-1]), file=sys.stderr, flush=True)
    return out
