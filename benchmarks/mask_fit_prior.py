"""Does MaskInversion's own fit say which proposals are objects?

MaskInversion optimises a token until its LeGrad map matches the region's mask. A region the
model can localise (an object) should be matched well; a background fragment, or an object
fused with its surroundings, should not. This measures that, on the search task's collection
(automatic proposals as ``regionsearch index`` makes them), and what a search would gain from
ranking with it:

- the AUC of the final Dice loss at telling object proposals (IoU >= 0.5 with some object)
  from the rest, beside the proposer's objectness;
- search mAP over proposals with the embedder's defaults, plus ``-w * loss`` for each ``w``
  (folded into the objectness prior, so every other switch runs as the searcher runs it);
- the same with a hard cut instead (proposals whose loss exceeds ``t`` dropped);
- what the top 20 results of each query are with the defaults: hits, objects of other classes,
  parts, background.

``python benchmarks/mask_fit_prior.py --scenes 60 --family train --seed 5150 --threads 2``
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from regionsearch.backbone import Backbone
from regionsearch.embedders import get_embedder
from regionsearch.eval.datasets import RegionDataset
from regionsearch.eval.runner import TextCache
from regionsearch.eval.search_collection import collect
from regionsearch.eval.search_task import (
    bank_vectors,
    ceiling_options,
    query_texts,
    rankings,
    score_queries,
)
from regionsearch.eval.world_split import heldout_world
from regionsearch.masks import AutomaticProposals
from regionsearch.masks import rle as rle_mod
from regionsearch.search.postprocess import hubness_direction, model_cell_fraction, results_for


def invert_all(embedder, collection, source: str) -> tuple[np.ndarray, np.ndarray]:
    """``(R, d)`` vectors and ``(R,)`` last-step Dice losses of one region set."""
    regions = collection.sources[source]
    vectors, losses = [], []
    for pixels, rles in zip(collection.images, regions.rles, strict=True):
        masks = torch.from_numpy(rle_mod.decode_many(rles).astype(np.float32))
        result = embedder.invert(pixels, masks, return_maps=False)
        vectors.append(result.embeddings.numpy())
        losses.append(result.mask_losses[-1].numpy())
    return np.concatenate(vectors).astype(np.float32), np.concatenate(losses)


def top_kinds(collection, ranked, depth: int = 20) -> dict[str, int]:
    """What the first ``depth`` results of each query are (IoU 0.5 with an object is a match,
    0.1 a part); a second region on an object already found counts as a duplicate."""
    regions = collection.sources["proposals"]
    kinds = dict.fromkeys(
        ("hit", "duplicate", "part of the queried class", "other-class object",
         "part of another object", "background"), 0
    )  # fmt: skip
    for q, order in ranked:
        found: set[tuple[int, int]] = set()
        for r in order[:depth]:
            overlap, labels, image = regions.overlap[r], regions.label_of[r], regions.image_of[r]
            same = np.flatnonzero(labels == q)
            best = int(same[np.argmax(overlap[same])]) if same.size else -1
            if best >= 0 and overlap[best] >= 0.5:
                kind = "duplicate" if (image, best) in found else "hit"
                found.add((image, best))
            elif best >= 0 and overlap[best] >= 0.1:
                touched = {(image, int(g)) for g in same if overlap[g] >= 0.1}
                kind = "duplicate" if touched & found else "part of the queried class"
            elif (overlap[labels >= 0] >= 0.5).any():
                kind = "other-class object"
            elif (overlap[labels >= 0] >= 0.1).any():
                kind = "part of another object"
            else:
                kind = "background"
            kinds[kind] += 1
    return kinds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=60)
    parser.add_argument("--family", default="train")
    parser.add_argument("--seed", type=int, default=5150)
    parser.add_argument("--model", default="reference-v8")
    parser.add_argument("--weights", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.4])
    parser.add_argument("--cuts", type=float, nargs="+", default=[0.97, 0.95, 0.9])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    world = heldout_world(args.scenes, family=args.family, seed=args.seed)
    collection = collect(RegionDataset.from_world(world), AutomaticProposals())
    backbone = Backbone.load(args.model)
    embedder = get_embedder("maskinversion", backbone)
    cache = TextCache(backbone)
    texts = query_texts(collection, backbone, cache)
    bank = bank_vectors(backbone, "generic", collection, cache)
    direction = hubness_direction(bank)
    cell = model_cell_fraction(backbone)
    options = results_for("maskinversion")

    tick = time.perf_counter()
    vectors, loss = invert_all(embedder, collection, "proposals")
    gt_vectors, gt_loss = invert_all(embedder, collection, "ground-truth masks")
    seconds = time.perf_counter() - tick
    proposals = collection.sources["proposals"]
    is_object = proposals.overlap.max(axis=1) >= 0.5
    objectness = np.nan_to_num(proposals.objectness, nan=1.0)
    report = {
        "collection": collection.name,
        "proposals": int(proposals.size),
        "object share": float(is_object.mean()),
        "embed seconds": round(seconds, 1),
        "mean loss: objects / others / ground truth": [
            float(loss[is_object].mean()),
            float(loss[~is_object].mean()),
            float(gt_loss.mean()),
        ],
        "AUC object vs not: -loss": float(roc_auc_score(is_object, -loss)),
        "AUC object vs not: objectness": float(roc_auc_score(is_object, objectness)),
    }
    ceiling = score_queries(
        collection, "ground-truth masks", gt_vectors, texts, ceiling_options(options), cell,
        direction, 0.5, bank,
    )["mAP"]  # fmt: skip
    rows = []
    for w in [0.0, *args.weights]:
        # w * loss folded into the objectness prior: o' = o * exp(-w * loss / o_weight).
        shifted = dataclasses.replace(
            proposals, objectness=objectness * np.exp(-w * loss / options.objectness)
        )
        collection.sources["proposals"] = shifted
        got = score_queries(
            collection, "proposals", vectors, texts, options, cell, direction, 0.5, bank
        )
        rows.append({"w": w, **{k: got[k] for k in ("mAP", "P@10", "top-1")}})
        rows[-1]["share"] = got["mAP"] / ceiling
        print(json.dumps(rows[-1]), flush=True)
    for cut in args.cuts:
        dropped = loss > cut
        # A zero area makes the degenerate-region prior drop the region before anything else.
        collection.sources["proposals"] = dataclasses.replace(
            proposals, area=np.where(dropped, 0.0, proposals.area)
        )
        got = score_queries(
            collection, "proposals", vectors, texts, options, cell, direction, 0.5, bank
        )
        rows.append(
            {"cut": cut, "dropped": float(dropped.mean()), "objects lost": int((dropped & is_object).sum()),
             "objects": int(is_object.sum()), "mAP": got["mAP"]}
        )  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    collection.sources["proposals"] = proposals
    ranked = rankings(collection, "proposals", vectors, texts, options, cell, direction, bank=bank)
    report["top-20 kinds, defaults"] = top_kinds(collection, ranked)
    report["corr(loss, log area), corr(loss, log objectness)"] = [
        float(np.corrcoef(loss, np.log(proposals.area))[0, 1]),
        float(np.corrcoef(loss, np.log(np.clip(objectness, 1e-3, 1.0)))[0, 1]),
    ]
    report["ceiling mAP"] = ceiling
    report["rows"] = rows
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
