""""More like this" quality: does a region's similar list start with regions of its own class?

A held-out generated world (``regionsearch eval``'s split) is indexed with its ground-truth
masks (class labels stored with every region) by the indexer itself, once per embedder. Every
region then asks :func:`regionsearch.search.examples.similar` for ``k`` regions; P@k is the
share of them with the query's class, P@1 whether the first one has it. ``chance`` is the
share of the *other* regions with the query's class (what a random list would score).
Settings: ``examples`` (the route's default: the searcher's switches without the text-bank
hubness calibration), ``text defaults`` (with it), ``plain`` (raw cosine order).

    OMP_NUM_THREADS=1 python benchmarks/similar_quality.py --scenes 100 \\
        --json benchmarks/results/similar_quality_world.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.machine import describe  # noqa: E402
from regionsearch.backbone import Backbone  # noqa: E402
from regionsearch.embedders import get_embedder  # noqa: E402
from regionsearch.eval.cli import heldout_world  # noqa: E402
from regionsearch.indexer.pipeline import Indexer  # noqa: E402
from regionsearch.masks import CocoAnnotationSource  # noqa: E402
from regionsearch.search import RegionSearcher  # noqa: E402
from regionsearch.search.examples import EXAMPLE_RESULTS, similar  # noqa: E402
from regionsearch.search.postprocess import ResultOptions  # noqa: E402
from regionsearch.store import RegionIndex  # noqa: E402

SETTINGS = {
    "examples": EXAMPLE_RESULTS,
    "text defaults": ResultOptions(),
    "plain": ResultOptions.plain(),
}


def build_index(folder: Path, world: Path, backbone: Backbone, name: str) -> tuple[Path, float]:
    """Index the world's photos with their ground-truth masks; (index dir, seconds)."""
    embedder = get_embedder(name, backbone)
    directory = folder / name
    index = RegionIndex.create(
        directory, model=backbone.name, embedder=name, dimension=backbone.embed_dim
    )
    tick = time.perf_counter()
    try:
        source = CocoAnnotationSource(world / "instances.json")
        Indexer(index, backbone, embedder, source, workers=0, progress=False).run(world / "images")
    finally:
        index.close()
    return directory, time.perf_counter() - tick


def score(searcher: RegionSearcher, k: int, options: ResultOptions) -> dict[str, float]:
    """Mean P@k, P@1 and chance over every region of the index as the query."""
    regions = [
        r for img in searcher.index.iter_images() for r in searcher.index.regions_of_image(img.id)
    ]
    classes = Counter(r.category for r in regions)
    p_k, p_1, chance, returned = [], [], [], []
    for region in regions:
        hits = similar(searcher, region.id, k=k, results=options)
        same = [h.category == region.category for h in hits]
        p_k.append(sum(same) / k)
        p_1.append(float(bool(same) and same[0]))
        chance.append((classes[region.category] - 1) / (len(regions) - 1))
        returned.append(len(hits))
    return {
        "queries": len(regions),
        f"P@{k}": float(np.mean(p_k)),
        "P@1": float(np.mean(p_1)),
        "chance": float(np.mean(chance)),
        "mean returned": float(np.mean(returned)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=100)
    parser.add_argument("--world", type=Path, default=None, help="world folder (else held out)")
    parser.add_argument(
        "--embedders",
        nargs="+",
        default=["maskinversion", "alphaclip", "masked-crop", "crop", "red-circle", "global"],
    )
    parser.add_argument("--model", default="reference")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    world = args.world or heldout_world(args.scenes)
    backbone = Backbone.load(args.model)
    machine = describe()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.embedders:
            directory, seconds = build_index(Path(tmp), world, backbone, name)
            index = RegionIndex.open(directory, read_only=True)
            try:
                searcher = RegionSearcher(index, backbone)
                for label, options in SETTINGS.items():
                    tick = time.perf_counter()
                    row = {"embedder": name, "setting": label, **score(searcher, args.k, options)}
                    row["query_ms"] = 1000 * (time.perf_counter() - tick) / row["queries"]
                    row["index_seconds"] = round(seconds, 1)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            finally:
                index.close()

    print(f"\n{world.name}, model {args.model}; {machine}\n")
    print(f"| embedder | setting | P@{args.k} | P@1 | chance | query ms |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['embedder']} | {r['setting']} | {100 * r[f'P@{args.k}']:.1f} "
            f"| {100 * r['P@1']:.1f} | {100 * r['chance']:.1f} | {r['query_ms']:.1f} |"
        )
    if args.json:
        out = {"world": world.name, "model": args.model, "machine": machine, "rows": rows}
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
