"""End-to-end search quality: text queries against *automatic proposals*, as the product runs.

``regionsearch eval`` scores embedders on ground-truth masks. A user's index holds proposals
instead, so a query can also be answered by a region that covers an object badly, by a hole or
by a fragment. This benchmark indexes a held-out world split the way ``regionsearch index``
does (``AutomaticProposals`` with its defaults, then each embedder) and asks every class name
("a photo of a red star.") of the split as a query against all regions of all images.

Scoring is detection-style: a hit is a region with mask IoU >= ``--iou`` with a ground-truth
object of the queried class that no higher-ranked region has already matched (duplicates count
as misses). Per query: AP over the whole ranking (normalised by the number of such objects),
precision of the top 10, and whether the top hit is right; means over the queries. The
``ground-truth masks`` source, where the regions *are* the objects, gives the ceiling.

    python benchmarks/search_quality.py --scenes 200 --embedders maskinversion alphaclip masked-crop global
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from regionsearch.backbone import Backbone  # noqa: E402
from regionsearch.embedders import get_embedder  # noqa: E402
from regionsearch.eval.cli import heldout_world  # noqa: E402
from regionsearch.eval.datasets import RegionDataset  # noqa: E402
from regionsearch.eval.runner import TextCache, class_templates  # noqa: E402
from regionsearch.masks import AutomaticProposals, iou_matrix  # noqa: E402


def query_metrics(
    scores: np.ndarray,
    image_of: np.ndarray,
    overlap: np.ndarray,
    gt_class: np.ndarray,
    objects: int,
    iou: float,
) -> tuple[float, float, bool]:
    """(AP, precision@10, top-1 hit) of one class query over all regions of the collection.

    Args:
        scores: ``(R,)`` similarity of every region to the query text.
        image_of: ``(R,)`` image index of each region.
        overlap: ``(R, G)`` IoU of each region with each ground-truth object of its own image.
        gt_class: ``(R, G)`` whether that object has the queried class.
        objects: how many objects of the queried class the collection holds.
        iou: match threshold.
    """
    relevant = gt_class & (overlap >= iou)  # (R, G): the region would find that object
    order = np.argsort(-scores, kind="stable")
    rank_of = np.empty_like(order)
    rank_of[order] = np.arange(len(order))
    candidates = np.flatnonzero(relevant.any(axis=1))
    hit_ranks: list[int] = []
    found: set[tuple[int, int]] = set()  # (image, object) already matched higher up
    for region in candidates[np.argsort(rank_of[candidates], kind="stable")]:
        image = int(image_of[region])
        free = [g for g in np.flatnonzero(relevant[region]) if (image, g) not in found]
        if free:
            found.add((image, max(free, key=lambda g: overlap[region, g])))
            hit_ranks.append(int(rank_of[region]))
    ranks = np.asarray(hit_ranks, dtype=np.int64)
    ap = float((np.arange(1, len(ranks) + 1) / (ranks + 1)).sum() / max(objects, 1))
    return ap, float((ranks < 10).sum() / 10), bool((ranks == 0).any())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=200)
    parser.add_argument("--seed", type=int, default=None, help="held-out world seed")
    parser.add_argument(
        "--embedders", nargs="+", default=["maskinversion", "alphaclip", "masked-crop", "global"]
    )
    parser.add_argument("--model", default="reference")
    parser.add_argument("--max-regions", type=int, default=50, help="proposals per image")
    parser.add_argument(
        "--min-area", type=float, default=None, help="proposals' min_area (fraction of the image)"
    )
    parser.add_argument("--iou", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    folder = heldout_world(args.scenes, **({"seed": args.seed} if args.seed else {}))
    dataset = RegionDataset.from_world(folder)
    backbone = Backbone.load(args.model)
    options = {} if args.min_area is None else {"min_area": args.min_area}
    proposer = AutomaticProposals(max_regions=args.max_regions, **options)
    images = list(dataset)

    start = time.perf_counter()
    sources: dict[str, list[np.ndarray]] = {"ground-truth masks": [], "proposals": []}
    for item in images:
        sources["ground-truth masks"].append(item.masks)
        sources["proposals"].append(np.stack([p.mask for p in proposer.propose(item.image)]))
    proposal_seconds = time.perf_counter() - start
    gt_label = [np.asarray(item.labels) for item in images]
    texts = TextCache(backbone).encode(dataset.class_names, class_templates(backbone)).numpy()
    objects_of = np.bincount(np.concatenate(gt_label), minlength=len(dataset.class_names))
    queries = np.flatnonzero(objects_of).tolist()

    rows: list[dict[str, Any]] = []
    for source, region_masks in sources.items():
        image_of = np.concatenate([np.full(len(m), i) for i, m in enumerate(region_masks)])
        area = np.concatenate([m.reshape(len(m), -1).mean(1) for m in region_masks])
        g_max = max(len(labels) for labels in gt_label)
        overlap = np.full((len(image_of), g_max), -1.0)
        label_of = np.full((len(image_of), g_max), -1)
        row = 0
        for masks, labels, item in zip(region_masks, gt_label, images, strict=True):
            overlap[row : row + len(masks), : len(labels)] = iou_matrix(masks, item.masks)
            label_of[row : row + len(masks), : len(labels)] = labels
            row += len(masks)
        covered = [
            (overlap[image_of == i, g] >= args.iou).any()
            for i, labels in enumerate(gt_label)
            for g in range(len(labels))
        ]
        for name in args.embedders:
            embedder = get_embedder(name, backbone)
            tick = time.perf_counter()
            vectors = np.concatenate(
                [
                    embedder.embed(item.image, masks).numpy()
                    for item, masks in zip(images, region_masks, strict=True)
                ]
            )
            seconds = time.perf_counter() - tick
            scores = texts @ vectors.T
            per_query = [
                query_metrics(scores[q], image_of, overlap, label_of == q, objects_of[q], args.iou)
                for q in queries
            ]
            ap, p10, top1 = (np.mean([m[i] for m in per_query]) for i in range(3))
            top_area = area[scores[queries].argmax(1)]  # where each query's top region falls
            rows.append(
                {
                    "regions": source,
                    "embedder": name,
                    "mAP": float(ap),
                    "P@10": float(p10),
                    "top1": float(top1),
                    "queries": len(queries),
                    "regions_total": len(image_of),
                    "object_recall": float(np.mean(covered)),
                    "top_under_1pct": float((top_area < 0.01).mean()),
                    "top_over_20pct": float((top_area > 0.2).mean()),
                    "embed_seconds": round(seconds, 1),
                }
            )
            print(json.dumps(rows[-1]), flush=True)

    print(
        f"\n{dataset.name}: {len(images)} scenes, {sum(len(x) for x in gt_label)} objects, "
        f"{len(queries)} class queries; proposals {proposal_seconds:.1f} s "
        f"({proposer!r}), IoU >= {args.iou}\n"
    )
    print(
        "| regions | embedder | mAP | P@10 | top-1 right | top-1 < 1% of image | top-1 > 20% "
        "| regions in the index | objects covered |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['regions']} | {r['embedder']} | {100 * r['mAP']:.1f} | {100 * r['P@10']:.1f} "
            f"| {100 * r['top1']:.1f} | {100 * r['top_under_1pct']:.1f} "
            f"| {100 * r['top_over_20pct']:.1f} | {r['regions_total']} "
            f"| {100 * r['object_recall']:.1f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
