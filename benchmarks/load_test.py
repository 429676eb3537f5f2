"""Bounded load test of ``GET /api/search`` on loopback: requests/s and p95 per concurrency.

Starts ``regionsearch serve`` semantics in a subprocess (uvicorn, 127.0.0.1, a free port) on an
index (``--index DIR``; default: a small synthetic index built here with the bundled reference
model, 2000 images x 10 regions with random unit vectors), then runs 1, 8 and 32 concurrent
httpx clients (threads), each sending queries from a phrase list until the per-level request
budget (``--requests``) or time budget (``--seconds``) is used. Any non-200 answer is an error;
the script exits non-zero if there was any.

The server runs as ``regionsearch serve`` does, with its own thread settings
(``Settings.threads``); the benchmark passes it no ``OMP_NUM_THREADS``. By default every phrase
is sent once before the levels, so the levels measure a server whose queries repeat (text
vectors cached); ``--distinct`` sends texts never seen before (every request encodes). The
1-minute load average before and after each level is recorded: on a shared machine, read
latencies with it (server CPU per request hardly depends on it).

    python benchmarks/load_test.py --json benchmarks/results/load_test.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe as describe_machine

SERVER = r"""
import sys, uvicorn
from regionsearch.api import Settings, create_app
settings = Settings(index_dir=sys.argv[1], read_only=True, device="cpu")
uvicorn.run(create_app(settings), host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_index(directory: Path, n_regions: int) -> None:
    from synthetic_index import build_sql, unit_vectors

    from regionsearch.store import RegionIndex, VectorStore

    dim = 256  # the reference model
    build_sql(directory, n_regions, dim, "reference")
    store = VectorStore(dim)
    store.add(np.arange(1, n_regions + 1, dtype=np.int64), unit_vectors(n_regions, dim, seed=1))
    store.save(directory / "vectors.faiss")
    RegionIndex.open(directory, read_only=True).close()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (Linux ``/proc``), to report server CPU per
    request: unlike latency it barely depends on what else the machine runs."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_level(
    base: str,
    concurrency: int,
    budget: int,
    seconds: float,
    texts: list[str],
    distinct: bool,
    server_pid: int | None = None,
) -> dict:
    import httpx

    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(budget))
    deadline = time.monotonic() + seconds

    def worker(wid: int) -> None:
        with httpx.Client(base_url=base, timeout=30.0) as client:
            while time.monotonic() < deadline:
                with lock:
                    n = next(counter, None)
                if n is None:
                    return
                q = texts[(n * 7 + wid) % len(texts)]
                if distinct:  # never seen before: the server's text cache cannot answer
                    q = f"{q} {concurrency}x{n}"
                t = time.perf_counter()
                try:
                    r = client.get("/api/search", params={"q": q, "k": 10})
                    ok = r.status_code == 200 and len(r.json()["results"]) == 10
                    err = None if ok else f"HTTP {r.status_code}"
                except httpx.HTTPError as exc:
                    err = repr(exc)
                dt = (time.perf_counter() - t) * 1000
                with lock:
                    latencies.append(dt)
                    if err:
                        errors.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    load_before = round(os.getloadavg()[0], 2)
    cpu0 = cpu_seconds(server_pid) if server_pid else 0.0
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    cpu = cpu_seconds(server_pid) - cpu0 if server_pid else float("nan")
    lat = np.asarray(latencies) if latencies else np.zeros(1)
    return {
        "concurrency": concurrency,
        "requests": len(latencies),
        "errors": len(errors),
        "error_samples": errors[:3],
        "wall_s": round(wall, 2),
        "requests_per_s": round(len(latencies) / wall, 1) if wall else 0.0,
        "p50_ms": round(float(np.percentile(lat, 50)), 1),
        "p95_ms": round(float(np.percentile(lat, 95)), 1),
        "server_cpu_ms_per_request": round(1000 * cpu / max(1, len(latencies)), 1),
        "load_avg_1m_before": load_before,
        "load_avg_1m_after": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, default=None)
    parser.add_argument("--regions", type=int, default=20_000, help="synthetic index size")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=300, help="per concurrency level")
    parser.add_argument("--seconds", type=float, default=60.0, help="per concurrency level")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument(
        "--distinct",
        action="store_true",
        help="every request a text never sent before (measures encoding, not the text cache)",
    )
    parser.add_argument("--note", default="", help="e.g. what else ran on the machine")
    args = parser.parse_args()

    from synthetic_index import phrases

    texts = phrases(200)
    with tempfile.TemporaryDirectory() as tmp:
        directory = args.index
        if directory is None:
            directory = Path(tmp) / "load-index"
            build_index(directory, args.regions)
        port = free_port()
        # as `regionsearch serve` runs: the server sets its own threads
        env = {
            k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
        }
        server = subprocess.Popen(
            [sys.executable, "-c", SERVER, str(directory), str(port)], env=env
        )
        base = f"http://127.0.0.1:{port}"
        try:
            import httpx

            start = time.monotonic()
            while True:
                try:
                    if httpx.get(base + "/api/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if server.poll() is not None or time.monotonic() - start > 180:
                    raise SystemExit("server did not start")
                time.sleep(0.5)
            run_level(base, 2, 10, 30, texts, args.distinct)  # warm-up
            if not args.distinct:  # each phrase once: the levels measure repeated queries
                run_level(base, 2, len(texts), 120, texts, False)
            levels = []
            for c in args.concurrency:
                levels.append(
                    run_level(
                        base, c, args.requests, args.seconds, texts, args.distinct, server.pid
                    )
                )
                print(json.dumps(levels[-1]), flush=True)
        finally:
            server.terminate()
            server.wait(timeout=30)
    report: dict[str, Any] = {
        "benchmark": "load_test",
        "endpoint": "GET /api/search?k=10 (text encoding + FAISS exact + SQL fetch)",
        "queries": "distinct (no cache hits)"
        if args.distinct
        else f"{len(texts)} phrases, repeated (each sent once before the levels)",
        "server": "uvicorn, 1 worker, loopback; read-only index",
        "index_regions": args.regions if args.index is None else None,
        "machine": describe_machine(),
        "levels": levels,
        "note": args.note,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    total_errors = sum(level["errors"] for level in levels)
    assert total_errors == 0, f"{total_errors} failed requests"


if __name__ == "__main__":
    main()
