"""Query latency (p50/p95, FAISS search + the SQL fetch of the hits) and ANN recall@10.

For each collection size (default 10k, 100k, 1M regions) it builds an index directory with
SQLite rows inserted in bulk (``executemany`` in one transaction, not the ORM) and random unit
vectors, then times ``RegionSearcher.search_vector`` — the same call the CLI and API make:
FAISS k-NN, then one ``SELECT ... WHERE id IN (...)`` for the hits — with three FAISS factories:

    exact  IDMap2,Flat
    hnsw   IDMap2,HNSW32          (efSearch --ef-search)
    ivf    IDMap2,IVF{4*sqrt(N)},Flat (nprobe --nprobe; trained on the collection vectors)

Recall@10 of each ANN index against exact search is measured with **text** query vectors: a few
hundred phrases encoded by the bundled reference model's text encoder when
``regionsearch/models/reference.safetensors`` exists (else the tiny random model, reported as
such). Note the database vectors are synthetic (``--data clustered``: unit vectors around N/50
random centres; ``random``: uniform on the sphere), which is what fits on a shared CPU box, so
the recall numbers measure the ANN structures with real text queries that lie off the
database's distribution (as text vs. image vectors do), not a real image-vector collection.

    python benchmarks/query_latency.py --sizes 10000 100000 1000000 --json out.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from machine import describe as describe_machine

COLOURS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple", "brown", "grey"]
THINGS = [
    "umbrella",
    "dog",
    "cat",
    "car",
    "bicycle",
    "chair",
    "bench",
    "tree",
    "cup",
    "bird",
    "boat",
    "kite",
    "horse",
    "bus",
    "clock",
    "vase",
    "person",
    "sign",
    "ball",
    "bag",
]
PLACES = ["on the left", "on the right", "in the middle", "near the window", "behind the car"]
FAKE_RLE = json.dumps({"size": [480, 640], "counts": "PPYo0a0d:?00O1N2O001N100O1O1N3Mg]i4"})


def phrases(n: int) -> list[str]:
    """``n`` distinct short phrases and referring expressions."""
    out = [f"a {c} {t}" for c, t in itertools.product(COLOURS, THINGS)]
    out += [f"the {c} {t} {p}" for c, t, p in itertools.product(COLOURS, THINGS, PLACES)]
    rng = np.random.default_rng(0)
    rng.shuffle(out)
    return out[:n]


def text_queries(n: int) -> tuple[np.ndarray, str]:
    from regionsearch.backbone import Backbone
    from regionsearch.backbone.loading import bundled_models_dir
    from regionsearch.backbone.tiny import tiny_loaded_model

    if (bundled_models_dir() / "reference.safetensors").exists():
        backbone = Backbone.load("reference", device="cpu")
    else:
        backbone = Backbone(tiny_loaded_model(), device="cpu")
    texts = phrases(n)
    vecs = backbone.encode_text(texts, templates=None).numpy().astype(np.float32)
    return vecs, backbone.name


def unit_vectors(n: int, d: int, seed: int, clustered: bool = True) -> np.ndarray:
    """Random unit vectors; ``clustered``: around ``n/50`` random centres (as embeddings are)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, d), np.float32)
    centres = rng.standard_normal((max(1, n // 50), d), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    for start in range(0, n, 100_000):
        block = rng.standard_normal((min(100_000, n - start), d), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        if clustered:
            block = centres[rng.integers(0, len(centres), len(block))] + 0.6 * block
            block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[start : start + len(block)] = block
    return out


def build_sql(directory: Path, n_regions: int, dim: int, model: str) -> float:
    """Index directory with ``n_regions`` committed rows (10 regions/image); returns seconds."""
    from regionsearch.store import RegionIndex

    RegionIndex.create(directory, model=model, embedder="maskinversion", dimension=dim).close()
    t0 = time.perf_counter()
    con = sqlite3.connect(directory / "regions.db")
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=OFF")
    now = "2026-01-01 00:00:00.000000"
    n_images = (n_regions + 9) // 10
    with con:
        con.executemany(
            "INSERT INTO images (id, path, width, height, status, indexed_at, created_at) "
            "VALUES (?, ?, 640, 480, 'indexed', ?, ?)",
            ((i + 1, f"photos/{i // 1000:04d}/img{i:07d}.jpg", now, now) for i in range(n_images)),
        )
        con.executemany(
            "INSERT INTO regions (id, image_id, rle, bbox_x, bbox_y, bbox_w, bbox_h, area, "
            "source, source_score, embedder, vector_state, deleted, created_at) VALUES "
            "(?, ?, ?, 10, 20, 100, 80, 5000, 'proposal', 0.9, 'maskinversion', 'committed', 0, ?)",
            ((r + 1, r // 10 + 1, FAKE_RLE, now) for r in range(n_regions)),
        )
    con.close()
    return time.perf_counter() - t0


def build_store(factory: str, vectors: np.ndarray, ids: np.ndarray, args: Any) -> Any:
    from regionsearch.store import VectorStore

    n = len(vectors)
    options: dict[str, Any] = {}
    if factory.startswith("IVF"):
        options = {"train_size": min(n, 32 * int(factory[3:].split(",")[0])), "nprobe": args.nprobe}
    if factory.startswith("HNSW"):
        options = {"ef_search": args.ef_search}
    store = VectorStore(vectors.shape[1], factory, **options)
    for start in range(0, n, 100_000):
        store.add(ids[start : start + 100_000], vectors[start : start + 100_000])
    if not store.is_trained:
        store.train()
    return store


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def run_size(n: int, queries: np.ndarray, model: str, args: Any, work: Path) -> dict[str, Any]:
    from regionsearch.search import RegionSearcher
    from regionsearch.store import RegionIndex

    dim = queries.shape[1]
    directory = work / f"bench-{n}"
    sql_s = build_sql(directory, n, dim, model)
    vectors = unit_vectors(n, dim, seed=n, clustered=args.data == "clustered")
    ids = np.arange(1, n + 1, dtype=np.int64)
    result: dict[str, Any] = {"regions": n, "sql_bulk_insert_s": round(sql_s, 2), "factories": {}}
    nlist = max(16, int(4 * np.sqrt(n)))
    factories = {"exact": "Flat", "hnsw": "HNSW32", "ivf": f"IVF{nlist},Flat"}
    exact_ids = None
    index = RegionIndex.open(directory, read_only=True)
    searcher = RegionSearcher(index, backbone=None)
    try:
        for label in args.factories:
            if label == "hnsw" and n > args.hnsw_max:
                result["factories"][label] = {
                    "skipped": f"HNSW build over {args.hnsw_max} regions "
                    "does not fit this box's time budget"
                }
                continue
            t0 = time.perf_counter()
            store = build_store(factories[label], vectors, ids, args)
            build_s = time.perf_counter() - t0
            index.vectors = store  # same RegionIndex/SQL; only the FAISS structure changes
            faiss_ids = store.search(queries, args.k)[1]  # batch, for recall
            if label == "exact":
                exact_ids = faiss_ids
            lat, faiss_ms, fetch_ms = [], [], []
            for q in queries[: args.timed]:
                t = time.perf_counter()
                hits = searcher.search_vector(q, k=args.k)
                lat.append((time.perf_counter() - t) * 1000)
                faiss_ms.append(searcher.last_timings["faiss_ms"])
                fetch_ms.append(searcher.last_timings["fetch_ms"])
                assert len(hits) == args.k
            entry = {
                "factory": store.factory,
                "build_s": round(build_s, 2),
                "p50_ms": round(percentile(lat, 50), 3),
                "p95_ms": round(percentile(lat, 95), 3),
                "faiss_p50_ms": round(percentile(faiss_ms, 50), 3),
                "sql_fetch_p50_ms": round(percentile(fetch_ms, 50), 3),
                "sql_fetch_p95_ms": round(percentile(fetch_ms, 95), 3),
                "timed_queries": len(lat),
            }
            if exact_ids is not None and label != "exact":
                inter = [len(set(a) & set(b)) for a, b in zip(faiss_ids, exact_ids, strict=True)]
                entry[f"recall@{args.k}"] = round(float(np.mean(inter)) / args.k, 4)
            result["factories"][label] = entry
            print(f"  {n:>8} {label:<5} {json.dumps(entry)}", flush=True)
            del store
            index.vectors = None
    finally:
        index.vectors = None
        index.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--factories", nargs="+", default=["exact", "hnsw", "ivf"])
    parser.add_argument("--queries", type=int, default=300, help="text queries (recall)")
    parser.add_argument("--timed", type=int, default=200, help="queries timed one by one")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--ef-search", type=int, default=64)
    parser.add_argument("--hnsw-max", type=int, default=200_000)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="FAISS OpenMP threads "
        "(1: OpenMP spin-waiting on a shared, loaded box inflates latency)",
    )
    parser.add_argument("--data", choices=["clustered", "random"], default="clustered")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import faiss

    faiss.omp_set_num_threads(args.threads)
    queries, model = text_queries(args.queries)
    print(f"{len(queries)} text queries from model {model!r}, d={queries.shape[1]}", flush=True)
    report: dict[str, Any] = {
        "benchmark": "query_latency",
        "machine": describe_machine(),
        "faiss_threads": args.threads,
        "query_model": model,
        "database_vectors": f"{args.data} random unit vectors",
        "k": args.k,
        "nprobe": args.nprobe,
        "ef_search": args.ef_search,
        "latency_includes": "FAISS search + SQL fetch of the k hits (SQLite, one IN query)",
        "sizes": [],
    }
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for n in args.sizes:
            t0 = time.perf_counter()
            report["sizes"].append(run_size(n, queries, model, args, Path(tmp)))
            report["sizes"][-1]["total_s"] = round(time.perf_counter() - t0, 1)
            if args.json:
                args.json.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
