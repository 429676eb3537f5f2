""""More like this" quality: does a region's similar list start with regions of its own class?

A held-out generated world (``regionsearch eval``'s split) is indexed with its ground-truth
masks (class labels stored with every region) by the indexer itself, once per embedder. Every
region then asks :func:`regionsearch.search.examples.similar` for ``k`` regions; P@k is the
share of them with the query's class, P@1 whether the first one has it. ``chance`` is the
share of the *other* regions with the query's class (what a random list would score).
Settings: ``examples`` (the route's default: the searcher's switches without the text-bank
hubness calibration), ``text defaults`` (with it), ``plain`` (raw cosine order).

``--masks proposals`` indexes automatic proposals instead (as ``regionsearch index`` does by
default); a proposal takes the class of the ground-truth object it overlaps at IoU >= 0.5, only
labelled proposals are queries, and an unlabelled hit counts as a miss.

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
from regionsearch.eval.world_split import heldout_world  # noqa: E402
from regionsearch.indexer.pipeline import Indexer  # noqa: E402
from regionsearch.masks import AutomaticProposals, CocoAnnotationSource, iou_matrix  # noqa: E402
from regionsearch.search import RegionSearcher  # noqa: E402
from regionsearch.search.examples import EXAMPLE_RESULTS, similar  # noqa: E402
from regionsearch.search.postprocess import ResultOptions  # noqa: E402
from regionsearch.store import RegionIndex  # noqa: E402

SETTINGS = {
    "examples": EXAMPLE_RESULTS,
    "text defaults": ResultOptions(),
    "plain": ResultOptions.plain(),
}


def build_index(
    folder: Path, world: Path, backbone: Backbone, name: str, masks: str
) -> tuple[Path, float]:
    """Index the world's photos (ground-truth masks or proposals); (index dir, seconds)."""
    embedder = get_embedder(name, backbone)
    directory = folder / f"{name}-{masks}"
    index = RegionIndex.create(
        directory, model=backbone.name, embedder=name, dimension=backbone.embed_dim
    )
    source = (
        CocoAnnotationSource(world / "instances.json") if masks == "gt" else AutomaticProposals()
    )
    tick = time.perf_counter()
    try:
        Indexer(index, backbone, embedder, source, workers=0, progress=False).run(world / "images")
    finally:
        index.close()
    return directory, time.perf_counter() - tick


def region_labels(index: RegionIndex, world: Path, iou: float) -> dict[int, str | None]:
    """Class of every region: its own (ground truth), or that of the ground-truth object it
    overlaps at IoU >= ``iou`` (proposals); ``None`` when it overlaps none."""
    truth = CocoAnnotationSource(world / "instances.json")
    labels: dict[int, str | None] = {}
    for image in index.iter_images():
        regions = index.regions_of_image(image.id)
        if all(r.category is not None for r in regions):
            labels.update({r.id: r.category for r in regions})
            continue
        height, width = regions[0].rle["size"]
        objects = truth.masks_for(Path(image.path), np.zeros((height, width, 3), np.uint8))
        overlap = iou_matrix([r.rle for r in regions], [o.mask for o in objects])
        for r, row in zip(regions, overlap, strict=True):
            best = int(np.argmax(row)) if row.size else -1
            labels[r.id] = objects[best].category if best >= 0 and row[best] >= iou else None
    return labels


def score(
    searcher: RegionSearcher,
    k: int,
    options: ResultOptions,
    labels: dict[int, str | None],
    max_queries: int | None = None,
) -> dict[str, float]:
    """Mean P@k, P@1 and chance over the labelled regions as queries (a seeded sample of
    ``max_queries`` of them when there are more)."""
    classes = Counter(labels.values())
    queries = [(r, label) for r, label in labels.items() if label is not None]
    if max_queries is not None and len(queries) > max_queries:
        picked = np.random.default_rng(0).choice(len(queries), max_queries, replace=False)
        queries = [queries[i] for i in sorted(picked)]
    p_k, p_1, chance, returned = [], [], [], []
    for region_id, label in queries:
        hits = similar(searcher, region_id, k=k, results=options)
        same = [labels.get(h.region_id) == label for h in hits]
        p_k.append(sum(same) / k)
        p_1.append(float(bool(same) and same[0]))
        chance.append((classes[label] - 1) / (len(labels) - 1))
        returned.append(len(hits))
    return {
        "queries": len(p_k),
        "regions": len(labels),
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
    parser.add_argument("--masks", choices=["gt", "proposals"], default="gt")
    parser.add_argument("--iou", type=float, default=0.5, help="proposal labelling IoU")
    parser.add_argument("--max-queries", type=int, default=None, help="seeded sample of queries")
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
            directory, seconds = build_index(Path(tmp), world, backbone, name, args.masks)
            index = RegionIndex.open(directory, read_only=True)
            try:
                searcher = RegionSearcher(index, backbone)
                labels = region_labels(index, world, args.iou)
                for label, options in SETTINGS.items():
                    tick = time.perf_counter()
                    measured = score(searcher, args.k, options, labels, args.max_queries)
                    row = {"embedder": name, "masks": args.masks, "setting": label, **measured}
                    row["query_ms"] = 1000 * (time.perf_counter() - tick) / row["queries"]
                    row["index_seconds"] = round(seconds, 1)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            finally:
                index.close()

    print(f"\n{world.name}, {args.masks} masks, model {args.model}; {machine}\n")
    print(f"| embedder | setting | P@{args.k} | P@1 | chance | query ms |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['embedder']} | {r['setting']} | {100 * r[f'P@{args.k}']:.1f} "
            f"| {100 * r['P@1']:.1f} | {100 * r['chance']:.1f} | {r['query_ms']:.1f} |"
        )
    if args.json:
        out = {
            "world": world.name,
            "masks": args.masks,
            "model": args.model,
            "machine": machine,
            "rows": rows,
        }
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
