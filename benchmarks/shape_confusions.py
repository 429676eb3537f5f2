"""Which shapes a reference model names on single objects, by fill: texture read as shape?

Single-object scenes of one world-v2 family (sizes as the zero-shot gate), the model's top-1
class among the 64 prompts; per fill (``flat``, ``dots``, ...): shape accuracy, the predicted
shapes against the true ones, and the commonest (true -> predicted) confusions. A model that
reads a fill's texture elements as the object's shape over-predicts the shape of those
elements (dots -> circle / ring).

    python benchmarks/shape_confusions.py --model reference-v8 --n 1000 --seed 2025 \
        --json benchmarks/results/shape_confusions_v8.json
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from regionsearch.backbone.loading import bundled_models_dir
from regionsearch.backbone.preprocess import image_to_tensor
from regionsearch.eval.world.reference_model import make_tokenizer
from regionsearch.eval.world.scene_v2 import render_scene_v2
from regionsearch.eval.world.train_alphaclip import load_reference
from regionsearch.eval.world.vocab import SHAPES
from regionsearch.eval.world.zero_shot import HELDOUT_SINGLE_SIZES, class_text_features


@torch.no_grad()
def predicted_shapes(name: str, n: int, seed: int, family: str) -> list[tuple[str, str, str]]:
    """``(fill, true shape, predicted shape)`` for ``n`` fresh single-object scenes."""
    model, config = load_reference(bundled_models_dir(), name)
    prep = config["preprocess_cfg"]
    text = class_text_features(model, make_tokenizer(config["model_cfg"]))
    rng = np.random.default_rng(seed)
    scenes = [
        render_scene_v2(rng, family, 224, min_objects=1, max_objects=1,
                        size_range=HELDOUT_SINGLE_SIZES)
        for _ in range(n)
    ]  # fmt: skip
    out = []
    for start in range(0, n, 100):
        chunk = scenes[start : start + 100]
        pixels = torch.stack(
            [image_to_tensor(s.image, prep["size"], prep["mean"], prep["std"]) for s in chunk]
        )
        image = F.normalize(model.encode_image(pixels).float(), dim=-1)
        for scene, cls in zip(chunk, (image @ text.T).argmax(-1).tolist(), strict=True):
            obj = scene.objects[0]
            out.append((obj.pattern, obj.shape, SHAPES[cls % len(SHAPES)]))
    return out


def summary(rows: list[tuple[str, str, str]]) -> dict[str, dict]:
    by_fill: dict[str, dict] = {}
    for fill in sorted({r[0] for r in rows}):
        mine = [(t, p) for f, t, p in rows if f == fill]
        true = collections.Counter(t for t, _ in mine)
        predicted = collections.Counter(p for _, p in mine)
        confusions = collections.Counter((t, p) for t, p in mine if t != p)
        by_fill[fill] = {
            "n": len(mine),
            "shape_acc": round(100 * sum(t == p for t, p in mine) / len(mine), 1),
            "true_share": {s: round(100 * true[s] / len(mine), 1) for s in SHAPES},
            "predicted_share": {s: round(100 * predicted[s] / len(mine), 1) for s in SHAPES},
            "top_confusions": [[t, p, c] for (t, p), c in confusions.most_common(8)],
        }
    return by_fill


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="reference-v8")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=2025)
    parser.add_argument("--family", default="heldout")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = summary(predicted_shapes(args.model, args.n, args.seed, args.family))
    print(f"{args.model}, {args.family} family, {args.n} single objects (seed {args.seed})")
    print("| fill | n | shape acc % | circle+ring true % | circle+ring predicted % |")
    print("|---|---:|---:|---:|---:|")
    for fill, r in result.items():
        true = r["true_share"]["circle"] + r["true_share"]["ring"]
        pred = r["predicted_share"]["circle"] + r["predicted_share"]["ring"]
        print(f"| {fill} | {r['n']} | {r['shape_acc']} | {true:.1f} | {pred:.1f} |")
    for fill, r in result.items():
        print(f"{fill}: top confusions (true, predicted, count) {r['top_confusions']}")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)},
                                         "by_fill": result}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
