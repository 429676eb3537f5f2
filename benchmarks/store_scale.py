"""The store at scale, end to end through ``RegionIndex``: issue 12's targets, measured.

For each size it builds a real index directory through the public API (``upsert_images``,
``add_images_regions``, ``checkpoint``; SQLite rows with real COCO RLE masks of realistic size,
boxes and scores; ``--regions-per-image`` regions an image) with realistic vectors (real region
embeddings replicated with covariance-shaped noise, d=512 by an inner-product-preserving lift:
``realistic_vectors.py``), then, in a **fresh search process** (so its memory is what a server
would hold):

- open time, read-only and memory-mapped (``RegionIndex.open(read_only=True, mmap=True)``);
- text-query recall@10 against exact top-10 over the same vectors, and latency **including the
  SQL fetch of the hits** (``search`` then ``fetch_regions``): p50/p95 over repeats;
- filters matching half the images: the image ids listed explicitly (``search(image_ids=...)``)
  and the filters a user types (``search(images=ImageFilter(...))``, post-filtered when broad):
  a path glob matching every other image, the first half of the folders (a folder when that is
  one folder, else the prefix glob ``photos/000*``) and the folder ``photos`` (every image);
  latency and recall against the exact filtered top-10 (phase ``path_truth`` streams the
  vectors for the path filters' truth; without it their recall is ``null``);
- time to the first result after open (a read-only open loads big segments in the
  background: ``store/segment_loading.py``), wall and CPU of the whole process;
- resident memory (VmRSS, and VmHWM: the peak) of that process after the queries.

While building it records every checkpoint's time against the vectors added since the previous
one (a checkpoint should cost what was added, not what is stored). The vector structure is the
store's default (segments; each merged segment structured by ``store.ann_policy``). The build
is a bulk load (no background merges unless ``--background-merge``); ``--compact`` then merges
everything the way ``regionsearch compact --all --memory-budget B`` does, in its own process
(its time, CPU and peak memory recorded: the merge streams). ``--sweep`` adds a curve of
recall and search CPU time at other ``nprobe``/``k_factor`` (the knobs ann_policy sets).

Phases (``build``, ``compact``, ``truth``, ``search``) save ``bench_<phase>.json`` in the size's
directory; ``--reuse`` keeps the directory and skips what is done, ``--redo PHASE`` measures a
phase again (e.g. the filter after a change in ``region_filters``), ``--phases`` runs some. The
exact top-10 is computed by streaming the vectors again (never all in memory).

    python benchmarks/store_scale.py --sizes 100000 1000000 --workdir runs/store_scale \
        --reuse --compact --memory-budget 8GB --sweep --json runs/store_scale/report.json
    python benchmarks/store_scale.py --sizes 10000000 --workdir runs/store_scale_10m --reuse \
        --phases build            # then, concurrently: --phases compact --compact ... and
                                  # --phases truth; then --phases search --sweep
    python benchmarks/store_scale.py --collect runs/store_scale runs/store_scale_10m \
        --json benchmarks/results/store_scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from machine import describe as describe_machine
from realistic_vectors import CACHE_DIR, COCO_TINY, Replicator, exact_topk, load_base
from store_scale_search import IMAGE_IDS, image_path, memory_kib, path_filters, search_phase

from regionsearch.store import NewRegion, RegionIndex
from regionsearch.store.ann_policy import choose_index

MODEL = "reference (lifted to d=512)"


# ----------------------------------------------------------------------------- data


def rle_pool(min_bytes: int, scale: int, limit: int = 4000) -> list[dict[str, Any]]:
    """Real COCO instance masks as RLE, photos upscaled ``scale``x, at least ``min_bytes``."""
    from regionsearch.masks import rle

    cache = CACHE_DIR / f"rle-pool-x{scale}-min{min_bytes}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    pool: list[dict[str, Any]] = []
    for split in ("train2017", "val2017"):
        coco = json.loads((COCO_TINY / "annotations" / f"instances_{split}.json").read_text())
        sizes = {i["id"]: (i["height"], i["width"]) for i in coco["images"]}
        for ann in coco["annotations"]:
            if ann.get("iscrowd") or not isinstance(ann["segmentation"], list):
                continue
            h, w = sizes[ann["image_id"]]
            polys = [[c * scale for c in p] for p in ann["segmentation"]]
            r = rle.from_polygons(polys, h * scale, w * scale)
            if len(json.dumps(r)) >= min_bytes:
                pool.append(
                    {"rle": r, "bbox": [c * scale for c in ann["bbox"]], "area": rle.area(r)}
                )
            if len(pool) >= limit:
                break
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(pool))
    return pool


def regions_for(pool: list[dict[str, Any]], first_row: int, count: int) -> list[NewRegion]:
    return [
        NewRegion(
            rle=pool[(first_row + j) % len(pool)]["rle"],
            bbox=tuple(pool[(first_row + j) % len(pool)]["bbox"]),
            area=float(pool[(first_row + j) % len(pool)]["area"]),
            source="proposal",
            source_score=0.5 + 0.5 * ((first_row + j) % 97) / 97,
        )
        for j in range(count)
    ]


# ----------------------------------------------------------------------------- build


def build(directory: Path, n: int, replicator: Replicator, args: Any) -> dict[str, Any]:
    """Ingest ``n`` regions through the public API; checkpoint timings; row -> id map saved."""
    choice = choose_index(n, replicator.dim) if args.factory == "policy" else None
    factory = choice.factory if choice else None if args.factory == "store" else args.factory
    options = choice.vector_options() if choice else {}
    pool = rle_pool(args.min_rle_bytes, args.rle_scale)
    per = args.regions_per_image
    row_ids = np.empty(n, np.int64)
    image_ids = np.empty((n + per - 1) // per, np.int64)
    checkpoints: list[dict[str, Any]] = []
    t_start, c_start = time.perf_counter(), time.process_time()
    index = RegionIndex.create(
        directory,
        model=MODEL,
        embedder="maskinversion",
        dimension=replicator.dim,
        **({"factory": factory} if factory else {}),
        vector_options={**options, "background_merge": args.background_merge},
        checkpoint_every_s=None,
        checkpoint_every_vectors=None,
    )
    try:
        since = 0
        for start, block in replicator.iter_chunks(n, args.batch_images * per):
            first_image = start // per
            count = (len(block) + per - 1) // per
            records = index.upsert_images(
                {
                    "path": image_path(first_image + i),
                    "width": 640 * args.rle_scale,
                    "height": 480 * args.rle_scale,
                }
                for i in range(count)
            )
            image_ids[first_image : first_image + count] = [r.id for r in records]
            items = [
                (
                    rec.id,
                    regions_for(pool, start + i * per, len(block[i * per : (i + 1) * per])),
                    block[i * per : (i + 1) * per],
                )
                for i, rec in enumerate(records)
            ]
            ids = index.add_images_regions(items)
            row_ids[start : start + len(block)] = np.concatenate(ids)
            since += len(block)
            if since >= args.checkpoint_every or start + len(block) >= n:
                t0, c0 = time.perf_counter(), time.thread_time()
                index.checkpoint()
                checkpoints.append(
                    {
                        "vectors_added": since,
                        "vectors_total": start + len(block),
                        "seconds": round(time.perf_counter() - t0, 3),
                        "cpu_seconds": round(time.thread_time() - c0, 3),
                    }
                )
                print(f"    checkpoint {json.dumps(checkpoints[-1])}", flush=True)
                with open(directory / "bench_checkpoints.jsonl", "a") as log:
                    log.write(json.dumps(checkpoints[-1]) + "\n")
                since = 0
        stats = index.stats()
    finally:
        index.close()
    build_s, build_cpu_s = time.perf_counter() - t_start, time.process_time() - c_start
    np.save(directory / "bench_row_ids.npy", row_ids)
    np.save(directory / IMAGE_IDS, image_ids)
    disk = {p.name: p.stat().st_size for p in directory.rglob("*") if p.is_file()}
    return {
        "factory": factory or "store default",
        "background_merge": args.background_merge,
        "vector_options": options,
        "build_s": round(build_s, 1),
        "build_cpu_s": round(build_cpu_s, 1),
        "regions_per_s": round(n / build_s),
        "regions_per_cpu_s": round(n / build_cpu_s),
        "checkpoints": checkpoints,
        "disk_bytes": sum(disk.values()),
        "disk_bytes_by_file": disk,
        "stats": _jsonable(stats),
    }


def _jsonable(value: Any) -> Any:
    try:
        from dataclasses import asdict

        value = asdict(value)
    except TypeError:
        pass
    return json.loads(json.dumps(value, default=str))


# ----------------------------------------------------------------------------- driver


def ground_truth(
    directory: Path, n: int, replicator: Replicator, queries: np.ndarray, args: Any
) -> None:
    """Exact top-k region ids, unfiltered and among half the images; saved for the searcher."""
    row_ids = np.load(directory / "bench_row_ids.npy")
    image_ids = np.load(directory / IMAGE_IDS)
    per = args.regions_per_image
    rng = np.random.default_rng(5)
    half_mask = rng.permutation(len(image_ids)) < len(image_ids) // 2
    _, rows = exact_topk(replicator.iter_chunks(n), queries, args.k)

    def allowed_chunks() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start, block in replicator.iter_chunks(n):
            keep = half_mask[(start + np.arange(len(block))) // per]
            yield start + np.flatnonzero(keep), block[keep]

    _, half_rows = exact_topk(allowed_chunks(), queries[: args.filter_queries], args.k)
    np.save(directory / "bench_queries.npy", queries)
    np.save(directory / "bench_truth.npy", row_ids[rows])
    np.save(directory / "bench_half_images.npy", image_ids[half_mask])
    np.save(directory / "bench_half_truth.npy", row_ids[half_rows])


def compact_phase(directory: Path, args: Any) -> dict[str, Any]:
    """Run in a fresh process: what ``regionsearch compact --all`` does, timed, with its peak
    memory (the merge must stream: never all vectors in RAM)."""
    import faiss

    faiss.omp_set_num_threads(args.compact_threads)
    options: dict[str, Any] = {"background_merge": False}
    if args.memory_budget:
        options["memory_budget"] = args.memory_budget
    t0, c0 = time.perf_counter(), time.process_time()
    index = RegionIndex.open(directory, vector_options=options)
    open_s = time.perf_counter() - t0
    try:
        t1, c1 = time.perf_counter(), time.process_time()
        rewritten = index.vectors.merge(everything=True)
        merge_s, merge_cpu_s = time.perf_counter() - t1, time.process_time() - c1
        backend = index.vectors.stats()
    finally:
        index.close()
    return {
        "memory_budget": args.memory_budget or "store default",
        "faiss_threads": args.compact_threads,
        "writable_open_s": round(open_s, 1),
        "segments_rewritten": rewritten,
        "seconds": round(merge_s, 1),
        "cpu_seconds": round(merge_cpu_s, 1),
        "total_cpu_seconds": round(time.process_time() - c0, 1),
        "segments_after": backend.get("segments"),
        "segment_factories": backend.get("segment_factories"),
        "peak_rss_mib": memory_kib().get("VmHWM", 0) // 1024,
        "disk_bytes_vectors": sum(
            p.stat().st_size for p in (directory / "vectors.segments").glob("*") if p.is_file()
        ),
    }


def subprocess_phase(flag: str, directory: Path, args: Any) -> dict[str, Any]:
    """Run a phase in a fresh interpreter (its memory is its own); its last stdout line."""
    command = [sys.executable, __file__, flag, str(directory)]
    command += ["--repeats", str(args.repeats), "--threads", str(args.threads)]
    command += ["--filter-queries", str(args.filter_queries)]
    command += ["--compact-threads", str(args.compact_threads)]
    command += ["--sweep", "--sweep-queries", str(args.sweep_queries)] if args.sweep else []
    command += ["--memory-budget", args.memory_budget] if args.memory_budget else []
    command += [] if args.mmap else ["--no-mmap"]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        return {"error": done.stderr[-3000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


PHASES = ("build", "compact", "truth", "path_truth", "search")


def path_truth(directory: Path, n: int, replicator: Replicator, args: Any) -> None:
    """Exact top-k among the images each of :func:`path_filters` matches: one streaming pass."""
    row_ids = np.load(directory / "bench_row_ids.npy")
    queries = np.load(directory / "bench_queries.npy")[: args.filter_queries]
    filters = path_filters(len(np.load(directory / IMAGE_IDS)))
    for name, (_, matches) in list(filters.items()):
        if matches.all():  # every image: the unfiltered truth, no pass needed
            truth = np.load(directory / "bench_truth.npy")[: len(queries)]
            np.save(directory / f"bench_{name}_truth.npy", truth)
            del filters[name]
    parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {name: [] for name in filters}
    for start, block in replicator.iter_chunks(n):
        rows = start + np.arange(len(block))
        for name, (_, matches) in filters.items():
            keep = matches[rows // args.regions_per_image]
            parts[name].append(exact_topk(iter([(rows[keep], block[keep])]), queries, args.k))
    for name, found in parts.items():
        scores = np.concatenate([s for s, _ in found], axis=1)
        order = np.argsort(-scores, axis=1, kind="stable")[:, : args.k]
        rows = np.take_along_axis(np.concatenate([i for _, i in found], axis=1), order, axis=1)
        np.save(directory / f"bench_{name}_truth.npy", row_ids[rows])


def run_size(n: int, replicator: Replicator, queries: np.ndarray, args: Any) -> dict[str, Any]:
    """Each phase's result is saved as ``bench_<phase>.json`` in the size's directory, so
    ``--reuse`` skips what is done (the 10M index is built once) and ``--redo`` re-measures."""
    directory = args.workdir / f"scale-{n}"
    if directory.exists() and not args.reuse:
        shutil.rmtree(directory)
    result: dict[str, Any] = {"regions": n, "images": -(-n // args.regions_per_image)}
    for phase in PHASES:
        saved = directory / f"bench_{phase}.json"
        if saved.exists() and phase not in args.redo:
            result[phase] = json.loads(saved.read_text())
            continue
        if phase not in args.phases or (phase == "compact" and not args.compact):
            continue
        print(f"  {n}: {phase}", flush=True)
        t0 = time.perf_counter()
        if phase == "build":
            result[phase] = build(directory, n, replicator, args)
        elif phase == "compact":
            result[phase] = subprocess_phase("--compact-dir", directory, args)
        elif phase == "truth":
            ground_truth(directory, n, replicator, queries, args)
            result[phase] = {"seconds": round(time.perf_counter() - t0, 1)}
        elif phase == "path_truth":
            path_truth(directory, n, replicator, args)
            result[phase] = {"seconds": round(time.perf_counter() - t0, 1)}
        else:
            result[phase] = subprocess_phase("--search-dir", directory, args)
        result[phase]["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        saved.write_text(json.dumps(result[phase], indent=1))
        print(f"  {n}: {phase} {json.dumps(result[phase])[:1500]}", flush=True)
    if not args.keep:
        shutil.rmtree(directory)
    return result


def git_state() -> str:
    """The commit measured, and whether the store's files had uncommitted changes."""
    repo = Path(__file__).resolve().parent.parent
    run = lambda *a: subprocess.run(  # noqa: E731
        ["git", *a], cwd=repo, capture_output=True, text=True, check=False
    ).stdout.strip()
    dirty = run("status", "--porcelain", "regionsearch/store")
    return run("log", "-1", "--format=%h %s")[:100] + (
        " (+ uncommitted store changes)" if dirty else ""
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument(
        "--factory",
        default="store",
        help="'store': the store's default (segments, each structured by ann_policy); "
        "'policy': ann_policy's choice for the whole size as one file; or a factory string",
    )
    parser.add_argument("--compact", action="store_true", help="merge all segments before search")
    parser.add_argument(
        "--memory-budget", default=None, help="the compaction's memory budget (e.g. 8GB)"
    )
    parser.add_argument(
        "--background-merge",
        action="store_true",
        help="let the writer merge small segments while ingesting (default: bulk load, "
        "then --compact)",
    )
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    parser.add_argument("--redo", nargs="*", choices=PHASES, default=[])
    parser.add_argument(
        "--reuse", action="store_true", help="keep each size's directory and its done phases"
    )
    parser.add_argument("--regions-per-image", type=int, default=50)
    parser.add_argument("--batch-images", type=int, default=200)
    parser.add_argument("--checkpoint-every", type=int, default=100_000)
    parser.add_argument("--min-rle-bytes", type=int, default=400)
    parser.add_argument("--rle-scale", type=int, default=2, help="COCO masks upscaled this much")
    parser.add_argument("--text-queries", type=int, default=0, help="0: all of them")
    parser.add_argument("--filter-queries", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--sweep", action="store_true", help="also sweep nprobe/k_factor")
    parser.add_argument("--sweep-queries", type=int, default=200)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="FAISS threads while searching")
    parser.add_argument(
        "--compact-threads", type=int, default=os.cpu_count() or 1, help="... while merging"
    )
    parser.add_argument("--no-mmap", dest="mmap", action="store_false")
    parser.add_argument("--workdir", type=Path, default=CACHE_DIR.parent / "store_scale")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--note", default="")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--collect", type=Path, nargs="+", default=None, help="only assemble WORKDIRs' phases"
    )
    parser.add_argument("--search-dir", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--compact-dir", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.search_dir is not None:
        print(json.dumps(search_phase(args.search_dir, args)))
        return
    if args.compact_dir is not None:
        print(json.dumps(compact_phase(args.compact_dir, args)))
        return
    args.keep = args.keep or args.reuse

    import faiss

    faiss.omp_set_num_threads(args.threads)
    base = load_base()
    db_rows, _ = base.split()
    replicator = Replicator(base.vectors[db_rows], args.dim)
    rng = np.random.default_rng(3)
    pick = rng.permutation(len(base.text_vectors))[: args.text_queries or None]
    queries = replicator.embed(base.text_vectors[np.sort(pick)])
    report = header(args, len(queries))
    if args.collect:  # each phase was measured by the code of its own time (measured_at)
        report["code"] = f"collected at {report['code']}"
        report["sizes"] = collect(args.collect)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    for n in args.sizes:
        print(f"{n} regions", flush=True)
        report["sizes"].append(run_size(n, replicator, queries, args))
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
    print(json.dumps([s.get("search") for s in report["sizes"]]))


def header(args: Any, n_queries: int) -> dict[str, Any]:
    """What a report says about the machine, the code and the data."""
    pool = rle_pool(args.min_rle_bytes, args.rle_scale)
    return {
        "benchmark": "store_scale",
        "machine": describe_machine(),
        "code": git_state(),
        "contention": args.note or f"shared box; load average at start {os.getloadavg()}",
        "dimension": args.dim,
        "vectors": "realistic_vectors.py: real MaskInversion region vectors (reference model), "
        "replicated with covariance-shaped noise, lifted to d=512",
        "regions_per_image": args.regions_per_image,
        "rle_json_bytes_mean": round(float(np.mean([len(json.dumps(p["rle"])) for p in pool]))),
        "text_queries": n_queries,
        "faiss_threads": args.threads,
        "sizes": [],
    }


def collect(workdirs: list[Path]) -> list[dict[str, Any]]:
    """Every size's saved phases under ``workdirs`` (``scale-N/bench_<phase>.json``), by size."""
    sizes = []
    for directory in sorted(
        (d for w in workdirs for d in w.glob("scale-*") if d.is_dir()),
        key=lambda d: int(d.name.split("-")[1]),
    ):
        n = int(directory.name.split("-")[1])
        entry: dict[str, Any] = {"regions": n, "directory": str(directory)}
        for phase in PHASES:
            saved = directory / f"bench_{phase}.json"
            if saved.exists():
                entry[phase] = json.loads(saved.read_text())
        for earlier in sorted(directory.glob("bench_search_*.json")):  # kept earlier runs
            entry.setdefault("earlier_searches", {})[earlier.stem] = json.loads(earlier.read_text())
        sizes.append(entry)
    return sizes


if __name__ == "__main__":
    main()
