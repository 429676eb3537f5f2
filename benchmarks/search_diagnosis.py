"""Why does end-to-end search over proposals keep only part of its ground-truth ceiling?

Runs the ``search`` task's pieces (:mod:`regionsearch.eval.search_task`) on a small world
sample and takes the loss apart:

* proposal recall: share of objects with a proposal at IoU >= 0.5, the best-IoU distribution,
  by object size;
* what the top 10 of every class query are (after the searcher's result switches): hits,
  duplicates, objects of another class, fragments (mostly inside one object, IoU < 0.5),
  supersets (hold most of an object plus background) and background;
* oracles: mAP when every region matching no object at IoU >= 0.5 is removed (perfect
  objectness), and the rank of each object's best proposal next to its ground-truth mask;
* every result-options variant given with ``--variant NAME:KEY=VALUE,...``, next to the
  defaults: the searcher's for an index of that embedder (``results_for``), which the
  variant's keys change (e.g. ``--variant off:superset_margin=None,open_set=0,calibration=1``;
  name every key a comparison depends on, so that it does not move with the defaults).

Collections and region vectors are cached under ``--store`` so variants re-rank for free::

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/search_diagnosis.py --family heldout \\
        --scenes 500 --limit 30 --model reference-v2 --embedders masked-crop alphaclip
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import pickle
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
from regionsearch.eval.datasets import RegionDataset  # noqa: E402
from regionsearch.eval.runner import TextCache  # noqa: E402
from regionsearch.eval.search_collection import (  # noqa: E402
    SearchCollection,
    collect,
    embed_regions,
)
from regionsearch.eval.search_task import (  # noqa: E402
    bank_vectors,
    ceiling_options,
    match_ranking,
    query_texts,
    rankings,
    score_queries,
)
from regionsearch.eval.world_split import heldout_world  # noqa: E402
from regionsearch.masks import AutomaticProposals  # noqa: E402
from regionsearch.search.postprocess import (  # noqa: E402
    ResultOptions,
    hubness_direction,
    model_cell_fraction,
    results_for,
)

KINDS = ("hit", "duplicate", "other class", "fragment", "superset", "background")


def cached(path: Path, make: Any) -> Any:
    """``make()``, pickled at ``path`` and reused on the next run."""
    if path.is_file():
        with path.open("rb") as f:
            return pickle.load(f)
    value = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        pickle.dump(value, f)
    return value


def object_geometry(collection: SearchCollection) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per proposal and object of its image: intersection / region and / object area."""
    props = collection.sources["proposals"]
    gt = collection.sources["ground-truth masks"]
    gt_area = np.full(props.overlap.shape, np.nan)
    for i in np.unique(props.image_of):
        areas = gt.area[gt.image_of == i]
        gt_area[props.image_of == i, : len(areas)] = areas
    iou = np.clip(props.overlap, 0.0, None)
    inter = iou * (props.area[:, None] + gt_area) / (1.0 + iou)  # fractions of the image
    in_region = np.nan_to_num(inter / props.area[:, None])
    in_object = np.nan_to_num(inter / gt_area)
    return inter, in_region, in_object


def recall_report(collection: SearchCollection) -> dict[str, Any]:
    """Best IoU per object, overall and by object area (fraction of the image)."""
    props = collection.sources["proposals"]
    gt = collection.sources["ground-truth masks"]
    best, size = [], []
    for i in np.unique(props.image_of):
        rows = props.image_of == i
        n = int((props.label_of[rows][0] >= 0).sum())
        best.append(props.overlap[rows][:, :n].max(0))
        size.append(gt.area[gt.image_of == i])
    b, s = np.concatenate(best), np.concatenate(size)
    out: dict[str, Any] = {
        "objects": int(b.size),
        "proposals_per_image": props.size / len(collection.images),
        "recall@0.5": float((b >= 0.5).mean()),
        "recall@0.7": float((b >= 0.7).mean()),
        "best_iou_quantiles(10,25,50,75)": [
            float(q) for q in np.quantile(b, [0.1, 0.25, 0.5, 0.75])
        ],
    }
    for lo, hi in ((0, 0.01), (0.01, 0.03), (0.03, 1.0)):
        sel = (s >= lo) & (s < hi)
        out[f"recall@0.5 area {lo}-{hi}"] = (float((b[sel] >= 0.5).mean()), int(sel.sum()))
    return out


def classify_top(
    order: np.ndarray,
    hits: np.ndarray,
    collection: SearchCollection,
    query: int,
    in_region: np.ndarray,
    in_object: np.ndarray,
) -> list[str]:
    """Kind (see :data:`KINDS`) of each ranked region."""
    props = collection.sources["proposals"]
    kinds = []
    for position, r in enumerate(order.tolist()):
        real = props.label_of[r] >= 0
        if hits[position]:
            kinds.append("hit")
        elif (props.overlap[r][real & (props.label_of[r] == query)] >= 0.5).any():
            kinds.append("duplicate")
        elif (props.overlap[r][real] >= 0.5).any():
            kinds.append("other class")
        elif (in_region[r][real] >= 0.5).any():
            kinds.append("fragment")
        elif (in_object[r][real] >= 0.5).any():
            kinds.append("superset")
        else:
            kinds.append("background")
    return kinds


def analyse(
    collection: SearchCollection,
    vectors: dict[str, np.ndarray],
    texts: np.ndarray,
    direction: np.ndarray,
    cell: float,
    options: ResultOptions,
    bank: np.ndarray,
) -> dict[str, Any]:
    """Top-10 kinds, the objectness oracle and best-proposal ranks of one embedder."""
    props = collection.sources["proposals"]
    gt = collection.sources["ground-truth masks"]
    _, in_region, in_object = object_geometry(collection)
    counts = dict.fromkeys(KINDS, 0)
    first = dict.fromkeys(KINDS, 0)
    areas: dict[str, list[float]] = {k: [] for k in KINDS}
    prop_rank, gt_rank = [], []
    is_object = (props.overlap >= 0.5).any(axis=1)
    ranked = zip(
        rankings(collection, "proposals", vectors["proposals"], texts, options, cell, direction, bank),
        rankings(
            collection, "ground-truth masks", vectors["ground-truth masks"], texts,
            ceiling_options(options), cell, direction, bank,
        ),
        strict=True,
    )  # fmt: skip
    for (q, order), (_, gt_order) in ranked:
        hits = match_ranking(order, props.image_of, props.overlap, props.label_of == q)
        kinds = classify_top(order[:10], hits[:10], collection, q, in_region, in_object)
        for position, kind in enumerate(kinds):
            counts[kind] += 1
            first[kind] += position == 0
            areas[kind].append(float(props.area[order[position]]))
        # Where the best proposal of every object of this class lands, next to its GT mask.
        position_of = np.empty(props.size, np.int64)
        position_of[:] = 10**9
        position_of[order] = np.arange(len(order))
        gt_position = np.empty(gt.size, np.int64)
        gt_position[gt_order] = np.arange(len(gt_order))
        for g_row in np.flatnonzero(gt.label_of[np.arange(gt.size), gt.local] == q):
            image, local = int(gt.image_of[g_row]), int(gt.local[g_row])
            rows = np.flatnonzero(props.image_of == image)
            best = rows[np.argmax(props.overlap[rows, local])]
            if props.overlap[best, local] >= 0.5:
                prop_rank.append(int(position_of[best]))
                gt_rank.append(int(gt_position[g_row]))
    oracle_props = dataclasses.replace(props)
    keep = is_object
    oracle = score_queries(
        dataclasses.replace(
            collection,
            sources={
                "proposals": _subset(oracle_props, keep),
                "ground-truth masks": gt,
            },
        ),
        "proposals",
        vectors["proposals"][keep],
        texts,
        options,
        cell,
        direction,
        bank=bank,
    )
    n = sum(counts.values())
    pr, gr = np.asarray(prop_rank), np.asarray(gt_rank)
    return {
        "top10 share": {k: round(v / max(n, 1), 3) for k, v in counts.items()},
        "top1 share": {k: round(v / len(collection.queries), 3) for k, v in first.items()},
        "top10 median area": {k: float(np.median(v)) if v else None for k, v in areas.items()},
        "oracle (non-objects removed) mAP": oracle["mAP"],
        "best proposal rank median / GT mask rank median": (
            float(np.median(pr)) if pr.size else None,
            float(np.median(gr)) if gr.size else None,
        ),
        "best proposal in top 10 / GT mask in top 10": (
            float((pr < 10).mean()) if pr.size else None,
            float((gr < 10).mean()) if gr.size else None,
        ),
    }


def _subset(regions: Any, keep: np.ndarray) -> Any:
    """A :class:`RegionSet` of the kept regions (self-IoU and locals re-indexed per image)."""
    rles, self_iou, local = [], [], np.zeros(int(keep.sum()), np.int64)
    kept_rows = np.flatnonzero(keep)
    for i in range(len(regions.rles)):
        rows = np.flatnonzero(regions.image_of == i)
        mine = keep[rows]
        rles.append([r for r, k in zip(regions.rles[i], mine, strict=True) if k])
        self_iou.append(regions.self_iou[i][np.ix_(mine, mine)])
    for i in np.unique(regions.image_of[kept_rows]):
        sel = regions.image_of[kept_rows] == i
        local[sel] = np.arange(int(sel.sum()))
    return dataclasses.replace(
        regions,
        rles=rles,
        image_of=regions.image_of[keep],
        area=regions.area[keep],
        overlap=regions.overlap[keep],
        label_of=regions.label_of[keep],
        self_iou=self_iou,
        local=local,
        objectness=None if regions.objectness is None else regions.objectness[keep],
    )


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME:KEY=VALUE,KEY=VALUE`` -> (NAME, options)."""
    name, _, rest = text.partition(":")
    out: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        out[key] = None if value == "None" else float(value)
    return name, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="heldout", help="world v2 family, or 'v1'")
    parser.add_argument("--scenes", type=int, default=500, help="size of the generated split")
    parser.add_argument("--seed", type=int, default=90417)
    parser.add_argument("--limit", type=int, default=30, help="first N scenes")
    parser.add_argument("--cache-dir", type=Path, default=REPO / "runs" / "evals" / "worlds")
    parser.add_argument("--images", type=Path, default=None, help="COCO-format image folder")
    parser.add_argument("--annotations", type=Path, default=None, help="COCO instances JSON")
    parser.add_argument("--model", default="reference-v2")
    parser.add_argument("--embedders", nargs="+", default=["masked-crop", "alphaclip"])
    parser.add_argument("--variant", action="append", default=[], help="NAME:KEY=VALUE,...")
    parser.add_argument("--proposals", default="", help="AutomaticProposals kwargs as JSON")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--store", type=Path, default=REPO / "runs" / "search_diagnosis")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.images is not None:
        dataset = RegionDataset(args.images, args.annotations, limit=args.limit)
    else:
        family = None if args.family == "v1" else args.family
        folder = heldout_world(args.scenes, args.seed, args.cache_dir, family=family)
        dataset = RegionDataset.from_world(folder, limit=args.limit)
    proposer_kwargs = json.loads(args.proposals) if args.proposals else {}
    proposer = AutomaticProposals(**proposer_kwargs)
    key = hashlib.sha1(f"{dataset.name}|{args.limit}|{proposer!r}".encode()).hexdigest()[:12]
    tick = time.perf_counter()
    collection = cached(args.store / f"collection-{key}.pkl", lambda: collect(dataset, proposer))
    print(f"{dataset.name}, {len(collection.images)} images, {proposer!r} ({key}); "
          f"{time.perf_counter() - tick:.1f} s")  # fmt: skip
    report: dict[str, Any] = {"dataset": dataset.name, "proposer": repr(proposer)}
    report["recall"] = recall_report(collection)
    print(json.dumps(report["recall"], indent=1))

    backbone = Backbone.load(args.model)
    cache = TextCache(backbone)
    texts = query_texts(collection, backbone, cache)
    bank = bank_vectors(backbone, "generic", collection, cache)
    direction = hubness_direction(bank)
    cell = model_cell_fraction(backbone)
    changes_of = dict(parse_variant(text) for text in args.variant)
    report["embedders"] = {}
    for name in args.embedders:
        embedder = get_embedder(name, backbone)
        defaults = results_for(name)
        variants = {"defaults": defaults}
        variants.update({k: dataclasses.replace(defaults, **c) for k, c in changes_of.items()})

        def embed(embedder: Any = embedder) -> dict[str, np.ndarray]:
            return {s: embed_regions(embedder, collection, s) for s in collection.sources}

        vectors = cached(args.store / f"vectors-{key}-{args.model}-{name}.pkl", embed)
        out: dict[str, Any] = {}
        for label, options in variants.items():
            got = score_queries(
                collection,
                "proposals",
                vectors["proposals"],
                texts,
                options,
                cell,
                direction,
                bank=bank,
            )
            ceiling = score_queries(
                collection,
                "ground-truth masks",
                vectors["ground-truth masks"],
                texts,
                ceiling_options(options),
                cell,
                direction,
                bank=bank,
            )
            out[label] = {
                "mAP": got["mAP"],
                "P@10": got["P@10"],
                "top-1": got["top-1"],
                "ceiling": ceiling["mAP"],
                "ratio": got["mAP"] / ceiling["mAP"] if ceiling["mAP"] else float("nan"),
            }
            print(name, label, json.dumps({k: round(v, 4) for k, v in out[label].items()}))
        out["analysis"] = analyse(collection, vectors, texts, direction, cell, defaults, bank)
        print(name, json.dumps(out["analysis"], indent=1), flush=True)
        report["embedders"][name] = out
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
