"""Query text encoding: padded vs trimmed forwards, the cache, and micro-batching under
concurrency (the bundled reference model; CPU).

- ``single``: median ms to encode one templated query, untrimmed (padded to the context
  length) vs trimmed, and a cache hit;
- ``concurrent``: queries/s with ``--threads`` callers encoding distinct queries at once,
  through the backbone's batcher (forwards merged, at most cores/threads at a time) vs one
  forward per caller with no cap (``slots`` = callers).

    OMP_NUM_THREADS=1 python benchmarks/text_encoding.py --json benchmarks/results/text_encoding.json
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe as describe_machine
from synthetic_index import phrases

from regionsearch.backbone import DEFAULT_TEMPLATES, Backbone
from regionsearch.backbone.text import TextBatcher, encode_texts


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return round(1000 * float(np.median(times)), 2)


def concurrent_rate(backbone: Backbone, slots: int | None, threads: int, texts: list[str]) -> dict:
    """``slots=None``: every caller runs its own forward at once (no batcher)."""

    def encode(batch, templates):
        return encode_texts(backbone.model, backbone.tokenizer, batch, templates, backbone.device)

    batcher = TextBatcher(encode, slots=slots) if slots else None
    chunks = [texts[i::threads] for i in range(threads)]

    def work(chunk):
        for text in chunk:
            if batcher is None:
                encode([text], DEFAULT_TEMPLATES)
            else:
                batcher.encode([text], DEFAULT_TEMPLATES)

    workers = [threading.Thread(target=work, args=(c,)) for c in chunks]
    t = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    wall = time.perf_counter() - t
    return {
        "slots": slots,
        "queries_per_s": round(len(texts) / wall, 1),
        "forwards": batcher.forwards if batcher else len(texts),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--queries", type=int, default=160)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    backbone = Backbone.load("reference", device="cpu")
    query = ["a red umbrella"]
    args_ = (backbone.model, backbone.tokenizer, query, DEFAULT_TEMPLATES, backbone.device)
    with torch.no_grad():
        single = {
            "untrimmed_ms": median_ms(lambda: encode_texts(*args_, trim=False), args.repeats),
            "trimmed_ms": median_ms(lambda: encode_texts(*args_, trim=True), args.repeats),
        }
    backbone.encode_text(query)
    single["cache_hit_ms"] = median_ms(lambda: backbone.encode_text(query), args.repeats)
    texts = [f"{p} {i}" for i, p in enumerate(phrases(args.queries))][: args.queries]
    concurrent_rate(backbone, 2, 2, texts[:8])  # warm-up
    report = {
        "benchmark": "text_encoding",
        "machine": describe_machine(),
        "torch_threads": torch.get_num_threads(),
        "single": single,
        "concurrent": {
            "threads": args.threads,
            "batched": concurrent_rate(backbone, backbone.text_batcher.slots, args.threads, texts),
            "one_forward_per_caller": concurrent_rate(backbone, None, args.threads, texts),
        },
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)


if __name__ == "__main__":
    main()
