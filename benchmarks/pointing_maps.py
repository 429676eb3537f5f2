"""Which map of a reference model points best? The pointing game for several explanations.

`regionsearch eval`'s pointing game scores LeGrad over the last block, the map MaskInversion has
to match. This asks whether the model's localisation is better than that map shows: LeGrad
summed over the last k blocks (k = 1 .. depth), and two maps read straight from the patch tokens
(each token through the head, as the dense training loss scores them): its cosine with the
class text, and its softmax probability of that class among all class prompts.

    python benchmarks/pointing_maps.py --world runs/evals/worlds/heldout-seed90417-n500-obj3-6-s224-v2-heldout \
        --model reference-v8 --limit 150
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from regionsearch.backbone.model import Backbone, load_backbone
from regionsearch.embedders.legrad import LeGrad, relevance_to_maps
from regionsearch.eval.datasets import RegionDataset
from regionsearch.eval.runner import TextCache, class_templates
from regionsearch.eval.tasks import colour_ambiguous, pointing_hits

#: Softmax temperature of the class-probability map (the trained logit scale is about 76).
PROBABILITY_SCALE = 100.0

MapFn = Callable[[torch.Tensor, torch.Tensor, tuple[int, int]], torch.Tensor]


def map_functions(backbone: Backbone, class_vectors: torch.Tensor) -> dict[str, MapFn]:
    """Name -> ``(pixels, queries, size) -> (Q, H, W)`` maps, one per explanation."""
    runner = backbone.vit
    functions: dict[str, MapFn] = {}
    for k in range(1, len(runner.blocks) + 1):
        legrad = LeGrad(runner, layers=k)
        functions[f"LeGrad, last {k} block(s)"] = lambda px, q, size, lg=legrad: lg.maps(
            px, q, size=size
        )[0]
    bank = F.normalize(class_vectors, dim=-1)

    @torch.no_grad()
    def patch_maps(px: torch.Tensor, q: torch.Tensor, size: tuple[int, int], soft: bool):
        tokens = F.normalize(runner.head(runner.run_blocks(runner.embed(px)))[0, 1:], dim=-1)
        if soft:
            probs = torch.softmax(PROBABILITY_SCALE * tokens @ bank.T, dim=-1)
            relevance = probs[:, _rows(q, bank)].T
        else:
            relevance = (tokens @ F.normalize(q, dim=-1).T).T
        grid = runner.grid_for(*px.shape[-2:])
        return relevance_to_maps(relevance, grid, tuple(px.shape[-2:]), size)

    functions["patch tokens: cosine with the class text"] = lambda px, q, size: patch_maps(
        px, q, size, soft=False
    )
    functions["patch tokens: class probability"] = lambda px, q, size: patch_maps(
        px, q, size, soft=True
    )
    return functions


def _rows(queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """Index of each query among the class vectors (queries are rows of the bank)."""
    return (F.normalize(queries, dim=-1) @ bank.T).argmax(dim=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=Path, required=True, help="world dataset folder")
    parser.add_argument("--model", default="reference-v8")
    parser.add_argument("--limit", type=int, default=150, help="first N scenes")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = RegionDataset(args.world / "images", args.world / "instances.json", limit=args.limit)
    backbone = load_backbone(args.model)
    class_vectors = TextCache(backbone).encode(list(data.class_names), class_templates(backbone))
    functions = map_functions(backbone, class_vectors)
    hits: dict[str, tuple[list, list]] = {name: ([], []) for name in functions}
    start = time.perf_counter()
    for item in data:
        labels = np.asarray(item.labels, dtype=np.int64)
        ambiguous = colour_ambiguous(item.labels, data.class_colours)
        pixels = backbone.preprocess(item.image, backbone.region_resolution)[None]
        queries = class_vectors[torch.as_tensor(labels)]
        for name, fn in functions.items():
            maps = fn(pixels, queries, tuple(item.masks.shape[-2:]))
            h, scored = pointing_hits(maps.numpy(), item.masks, labels)
            hits[name][0].append(h)
            hits[name][1].append(h[ambiguous[scored]])
    rows = []
    print(f"| {args.model}, {args.limit} scenes | pointing, all (%) | same colour (%) |")
    print("|---|---:|---:|")
    for name, (every, same) in hits.items():
        every, same = np.concatenate(every), np.concatenate(same)
        rows.append(
            {
                "map": name,
                "all": float(every.mean()),
                "n": int(every.size),
                "same_colour": float(same.mean()),
                "n_same_colour": int(same.size),
            }
        )
        print(f"| {name} | {100 * every.mean():.1f} | {100 * same.mean():.1f} |")
    print(f"{time.perf_counter() - start:.0f} s; n = {rows[0]['n']} / {rows[0]['n_same_colour']}")
    if args.json:
        args.json.write_text(
            json.dumps({"model": args.model, "limit": args.limit, "rows": rows}, indent=1)
        )


if __name__ == "__main__":
    main()
