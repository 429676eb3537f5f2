"""ANN recall@10 against latency on realistic region vectors: the curves behind store.ann_policy.

Database: real region embeddings of world scenes and coco-tiny photos (bundled reference model,
the product's embedder path), replicated to each size with covariance-shaped noise, d=512 by an
inner-product-preserving lift (see ``realistic_vectors.py``). Queries: text (class names,
prompts, referring expressions through the model's text tower) and image (held-out region
vectors never replicated into the database). Ground truth: exact top-10.

Structures (the factory strings ``VectorStore`` builds, behind its ``IDMap2`` layer):

    Flat                                   exact
    IVF{nlist},Flat                        nprobe sweep; nlist = ann_policy.ivf_nlist(n)
    HNSW32                                 efSearch sweep (build time limits it: --hnsw-max)
    OPQ{m},IVF{nlist},PQ{m},Refine(SQ8)    nprobe sweep at k_factor 4, then k_factor sweep

Latency is FAISS alone (one OpenMP thread; the store adds its SQL fetch, measured end to end in
``store_scale.py``): single queries (median and p95 over ``--repeats`` passes of ``--timed``
queries) and batches of ``--batch`` queries (per-query time, median over the passes). Memory per
vector is the serialised index size over ``n`` (codes, ids, graph links; centroids included).

    nice -n 10 python benchmarks/query_latency.py --sizes 100000 1000000 \
        --json benchmarks/results/query_latency.json --plot benchmarks/results/ann_recall_latency.png
"""

from __future__ import annotations

import argparse
import json
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from machine import describe as describe_machine
from realistic_vectors import CACHE_DIR, Replicator, describe, exact_topk, load_base, recall_at_k

from regionsearch.store.ann_policy import choose_index, ivf_nlist, pq_subquantizers

NPROBES = [1, 2, 4, 8, 16, 32, 64, 128, 256]
EF_SEARCHES = [16, 32, 64, 128, 256, 512]
K_FACTORS = [1, 2, 4, 8, 16, 32, 64, 128]
PQ_FACTORIES = [
    "OPQ{m},IVF{nlist},PQ{m},Refine(SQ8)",  # 8-bit PQ codes, re-ranked by SQ8
    "OPQ{m},IVF{nlist},PQ{m}x4fs,Refine(SQ8)",  # 4-bit fast-scan PQ (SIMD), re-ranked by SQ8
]


def timed(fn: Callable[[], Any]) -> tuple[float, float]:
    """Wall and CPU milliseconds of ``fn()`` (CPU: this thread; FAISS runs one OpenMP thread)."""
    w0, c0 = time.perf_counter(), time.thread_time()
    fn()
    return (time.perf_counter() - w0) * 1000, (time.thread_time() - c0) * 1000


def pct(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 4)


class Bench:
    """One size: database, queries, ground truth, and the measurement of one setting."""

    def __init__(self, database: np.ndarray, queries: dict[str, np.ndarray], args: Any) -> None:
        self.database, self.queries, self.args = database, queries, args
        self.truth = {name: exact_topk(database, q, args.k)[1] for name, q in queries.items()}
        rng = np.random.default_rng(1)
        mixed = np.concatenate(list(queries.values()))
        self.timed_queries = mixed[rng.permutation(len(mixed))[: args.timed]]

    def measure(self, index: Any, repeats: int | None = None) -> dict[str, Any]:
        """Recall per query kind, single-query and batched latency of ``index`` as configured."""
        k, out = self.args.k, {}
        for name, q in self.queries.items():
            found = index.search(q, k)[1]
            out[f"recall_{name}"] = round(recall_at_k(found, self.truth[name]), 4)
        single: list[tuple[float, float]] = []
        batched: list[tuple[float, float]] = []
        batch = self.timed_queries[: self.args.batch]
        for _ in range(repeats or self.args.repeats):
            for q in self.timed_queries:
                single.append(timed(lambda q=q: index.search(q[None], k)))
            wall, cpu = timed(lambda: index.search(batch, k))
            batched.append((wall / len(batch), cpu / len(batch)))
        for i, clock in enumerate(("", "cpu_")):
            out[f"single_{clock}p50_ms"] = pct([t[i] for t in single], 50)
            out[f"single_{clock}p95_ms"] = pct([t[i] for t in single], 95)
            out[f"batched_{clock}ms_per_query"] = round(
                float(np.median([t[i] for t in batched])), 4
            )
        return out


def build(factory: str, database: np.ndarray, train_size: int, seed: int = 0) -> dict[str, Any]:
    """``IDMap2,<factory>`` trained on a sample of ``train_size`` and filled with ``database``."""
    index = faiss.index_factory(database.shape[1], "IDMap2," + factory, faiss.METRIC_INNER_PRODUCT)
    t0 = time.perf_counter()
    trains = not index.is_trained
    if trains:
        rng = np.random.default_rng(seed)
        sample = database[np.sort(rng.permutation(len(database))[: min(train_size, len(database))])]
        index.train(sample)
    train_s = time.perf_counter() - t0
    ids = np.arange(len(database), dtype=np.int64)  # ids are row numbers, as in the truth
    for start in range(0, len(database), 100_000):
        index.add_with_ids(database[start : start + 100_000], ids[start : start + 100_000])
    add_s = time.perf_counter() - t0 - train_s
    nbytes = len(faiss.serialize_index(index))
    return {
        "index": index,
        "factory": factory,
        "train_points": min(train_size, len(database)) if trains else 0,
        "train_s": round(train_s, 1),
        "add_s": round(add_s, 1),
        "bytes_per_vector": round(nbytes / len(database), 1),
    }


def sweep(
    bench: Bench, built: dict[str, Any], knob: str, values: list[float], set_knob: Callable
) -> dict[str, Any]:
    index = built.pop("index")
    points = []
    for value in values:
        set_knob(index, value)
        point = {knob: value, **bench.measure(index)}
        points.append(point)
        print(f"    {built['factory']:<34} {json.dumps(point)}", flush=True)
    return {**built, "sweep": points}


def set_nprobe(index: Any, value: float) -> None:
    faiss.extract_index_ivf(index).nprobe = int(value)


def set_ef(index: Any, value: float) -> None:
    faiss.downcast_index(faiss.downcast_index(index).index).hnsw.efSearch = int(value)


def refine_layer(index: Any) -> Any:
    return faiss.downcast_index(faiss.downcast_index(index).index)


def run_size(
    n: int,
    replicator: Replicator,
    queries: dict[str, np.ndarray],
    args: Any,
    save: Callable[[dict[str, Any]], None],
) -> dict:
    """All structures at size ``n``; ``save(partial)`` after each (a run cut short keeps them)."""
    t0 = time.perf_counter()
    cache = CACHE_DIR / f"db-{n}-d{replicator.dim}-noise{replicator.noise}.npy"
    if cache.is_file():
        database = np.load(cache)
    else:
        database = replicator.generate(n)
        np.save(cache, database)
    print(f"  {n}: generated in {time.perf_counter() - t0:.0f} s", flush=True)
    bench = Bench(database, queries, args)
    structures: dict[str, Any] = {}
    result: dict[str, Any] = {
        "regions": n,
        "policy": choose_index(n, replicator.dim).factory,
        "structures": structures,
    }
    nlist = args.nlist or ivf_nlist(n)

    flat = build("Flat", database, 0)
    flat_index = flat.pop("index")
    structures["exact"] = {**flat, **bench.measure(flat_index, repeats=1)}
    del flat_index
    print(f"    exact {json.dumps(structures['exact'])}", flush=True)
    save(result)

    if "ivf" in args.structures:
        built = build(f"IVF{nlist},Flat", database, 30 * nlist)
        nprobes = [p for p in NPROBES if p <= nlist]
        structures["ivf"] = sweep(bench, built, "nprobe", nprobes, set_nprobe)
        save(result)

    if "hnsw" in args.structures and n <= args.hnsw_max:
        built = build("HNSW32", database, 0)
        structures["hnsw"] = sweep(bench, built, "ef_search", EF_SEARCHES, set_ef)
        save(result)
    elif "hnsw" in args.structures:
        structures["hnsw"] = {"skipped": f"HNSW build above --hnsw-max {args.hnsw_max}"}

    if "pq" in args.structures and n > args.pq_max:
        structures["ivfpq_refine"] = {"skipped": f"OPQ/PQ training above --pq-max {args.pq_max}"}
    elif "pq" in args.structures:
        m = pq_subquantizers(replicator.dim)
        for template in args.pq_factories:
            factory = template.format(m=m, nlist=nlist)
            key = "ivfpq" if template == PQ_FACTORIES[0] else factory
            built = build(factory, database, 30 * max(nlist, 256))
            index = built["index"]
            refine_layer(index).k_factor = args.k_factor
            nprobes = [p for p in NPROBES if 4 <= p <= nlist]
            structures[f"{key}_refine"] = sweep(bench, dict(built), "nprobe", nprobes, set_nprobe)
            set_nprobe(index, args.pq_nprobe)

            def set_k_factor(ix: Any, value: float) -> None:
                refine_layer(ix).k_factor = float(value)

            built["factory"] = f"{factory} nprobe={args.pq_nprobe}"
            structures[f"{key}_k_factor"] = sweep(bench, built, "k_factor", K_FACTORS, set_k_factor)
            structures[f"{key}_refine"]["k_factor"] = args.k_factor
            save(result)
    result["total_s"] = round(time.perf_counter() - t0, 1)
    return result


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = report["sizes"]
    fig, axes = plt.subplots(1, len(sizes), figsize=(6.5 * len(sizes), 5), squeeze=False)
    styles = {"ivf": "tab:blue", "hnsw": "tab:orange", "ivfpq_refine": "tab:green"}
    for ax, size in zip(axes[0], sizes, strict=True):
        exact = size["structures"]["exact"]
        ax.axvline(exact["single_cpu_p50_ms"], color="grey", ls=":", label="exact Flat (recall 1)")
        for name, colour in styles.items():
            s = size["structures"].get(name)
            if not s or "sweep" not in s:
                continue
            lat = [p["single_cpu_p50_ms"] for p in s["sweep"]]
            for kind, ls in (("text", "-"), ("image", "--")):
                rec = [p[f"recall_{kind}"] for p in s["sweep"]]
                ax.plot(lat, rec, ls, marker="o", ms=3, color=colour, label=f"{name} ({kind})")
            knob = next(k for k in s["sweep"][0] if k in ("nprobe", "ef_search"))
            for p in s["sweep"]:
                ax.annotate(str(p[knob]), (p["single_cpu_p50_ms"], p["recall_text"]), fontsize=6)
        ax.axhline(0.95, color="red", lw=0.6, ls="--")
        ax.set_xscale("log")
        ax.set_xlabel("median single-query CPU time, ms (FAISS, 1 thread)")
        ax.set_ylabel("recall@10 vs exact")
        ax.set_title(f"{size['regions']:,} regions, d={report['dimension']}")
        ax.set_ylim(0, 1.01)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    title = f"Realistic region vectors; {report['machine']}"
    fig.suptitle(textwrap.fill(title, 110), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--structures", nargs="+", default=["ivf", "hnsw", "pq"])
    parser.add_argument("--embedder", default="maskinversion")
    parser.add_argument("--image-queries", type=int, default=300)
    parser.add_argument("--timed", type=int, default=100, help="single queries timed per pass")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--k-factor", type=float, default=4.0)
    parser.add_argument("--pq-nprobe", type=int, default=64)
    parser.add_argument("--hnsw-max", type=int, default=200_000)
    parser.add_argument("--pq-max", type=int, default=200_000)
    parser.add_argument(
        "--pq-factories",
        nargs="+",
        default=PQ_FACTORIES[:1],
        help="compressed structures ({m}: d/8, {nlist}: the lists); e.g. " + PQ_FACTORIES[1],
    )
    parser.add_argument("--nlist", type=int, default=0, help="0: ann_policy.ivf_nlist(n)")
    parser.add_argument("--noise", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args()

    faiss.omp_set_num_threads(args.threads)
    base = load_base(args.embedder)
    db_rows, held = base.split()
    replicator = Replicator(base.vectors[db_rows], args.dim, noise=args.noise)
    rng = np.random.default_rng(2)
    image_q = base.vectors[held][rng.permutation(len(held))[: args.image_queries]]
    queries = {"text": replicator.embed(base.text_vectors), "image": replicator.embed(image_q)}
    report: dict[str, Any] = {
        "benchmark": "query_latency",
        "machine": describe_machine() + " (shared with other jobs: contended)",
        "faiss_threads": args.threads,
        "dimension": args.dim,
        "base": describe(base),
        "replication": {"noise": args.noise, "jitter": replicator.jitter, "lift": args.dim},
        "queries": {name: len(q) for name, q in queries.items()},
        "k": args.k,
        "latency": "FAISS search only (no SQL); single: p50/p95 over repeats x timed queries; "
        "wall ms, and cpu_ ms (this thread's CPU time: what a query costs without the "
        "contention of the shared box; wall times here are inflated by it)",
        "sizes": [],
    }

    def save(partial: dict[str, Any]) -> None:
        done = [s for s in report["sizes"] if s["regions"] != partial["regions"]]
        report["sizes"] = [*done, partial]
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
        if args.plot:
            plot(report, args.plot)

    for n in args.sizes:
        save(run_size(n, replicator, queries, args, save))


if __name__ == "__main__":
    main()
