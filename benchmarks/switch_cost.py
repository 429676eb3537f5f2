"""What each result switch costs a search: latency of ``RegionSearcher.search_vector`` per setting.

The switches that read stored vectors (the open-set term: each candidate's vector; the
repeated-stuff term: every region of each candidate's image, with its mask) add reads and small
matrix products to FAISS's search. This times one search per world class name (query vectors
encoded once, outside the timing) for each setting, ``--repeats`` passes, and reports the median
and p95 per query, "cold" (a fresh per-image mask cache before every search: what the first
search over those images pays) and "warm" (the searcher's cache kept between searches, as a
server's).

    python benchmarks/switch_cost.py --name demo --k 10 --repeats 5
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from machine import describe  # noqa: E402

from regionsearch.backbone import load_backbone  # noqa: E402
from regionsearch.cli.options import index_location  # noqa: E402
from regionsearch.eval.world.vocab import class_names  # noqa: E402
from regionsearch.search import RegionSearcher  # noqa: E402
from regionsearch.search.mask_relations import ImageMasksCache  # noqa: E402
from regionsearch.search.postprocess import ResultOptions, results_for  # noqa: E402
from regionsearch.store import RegionIndex  # noqa: E402


def settings(embedder: str) -> dict[str, ResultOptions]:
    """Plain cosine order, the index's defaults, and the defaults less each vector-reading term."""
    defaults = results_for(embedder)
    return {
        "plain": ResultOptions.plain(),
        "defaults": defaults,
        "defaults, repetition 0": dataclasses.replace(defaults, repetition=0.0),
        "defaults, open set 0": dataclasses.replace(defaults, open_set=0.0),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="index name or folder")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    index = RegionIndex.open(index_location(args.name), read_only=True)
    backbone = load_backbone(index.model, None, "cpu")
    searcher = RegionSearcher(index, backbone, threads=1)
    queries = [searcher.encode_query(name) for name in class_names()]
    report: dict[str, Any] = {
        "machine": describe(),
        "index": str(args.name),
        "embedder": index.embedder,
        "regions": index.stats().regions,
        "k": args.k,
        "settings": {},
    }
    for label, options in settings(index.embedder).items():
        row = {}
        for cache in ("cold", "warm"):
            times = []
            for _ in range(args.repeats):
                for query in queries:
                    if cache == "cold":  # no repetition score of an earlier search reused
                        searcher.image_masks = ImageMasksCache()
                    t0 = time.perf_counter()
                    searcher.search_vector(query, k=args.k, results=options)
                    times.append(time.perf_counter() - t0)
            ms = np.asarray(times) * 1000
            row[f"{cache} median_ms"] = float(np.median(ms))
            row[f"{cache} p95_ms"] = float(np.percentile(ms, 95))
        report["settings"][label] = row
        print(f"{label:32s} " + json.dumps({k: round(v, 2) for k, v in row.items()}), flush=True)
    index.close()
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
