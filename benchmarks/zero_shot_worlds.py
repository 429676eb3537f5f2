"""Single-object zero-shot of bundled reference models on three worlds, with colour/shape split.

The v1 world, the v2 ``train`` family and the v2 ``heldout`` family; the same fresh scenes for
every model (``--seed``), object sizes 0.15-0.5 of the short side on the v2 families, 64 classes,
prompt "a photo of a {}.". "colour" / "shape" = the predicted class has the right colour / shape,
which tells which half of a class a model gets wrong.

    python benchmarks/zero_shot_worlds.py --models reference reference-v2 reference-v3
    # the suite's guard check (seed 2025, held-out family) on more scenes than its 96:
    python benchmarks/zero_shot_worlds.py --models reference-v4 reference-v5 \
        --worlds "v2 heldout" --seed 2025 --n 1000
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from regionsearch.backbone.loading import bundled_models_dir
from regionsearch.eval.world.reference_model import make_tokenizer
from regionsearch.eval.world.train_alphaclip import load_reference
from regionsearch.eval.world.vocab import SHAPES
from regionsearch.eval.world.zero_shot import (
    HELDOUT_SINGLE_SIZES,
    EvalSet,
    class_text_features,
    make_eval_set,
)

WORLDS = {
    "v1 world": (None, None),
    "v2 train": ("train", HELDOUT_SINGLE_SIZES),
    "v2 heldout": ("heldout", HELDOUT_SINGLE_SIZES),
}


@torch.no_grad()
def scores(
    name: str, n: int, seed: int, worlds: list[str], scenes: dict[tuple, EvalSet]
) -> dict[str, dict[str, float]]:
    """Top-1 / right colour / right shape of one model; ``scenes`` caches the rendered sets, so
    models with the same preprocessing are scored on scenes rendered once."""
    model, config = load_reference(bundled_models_dir(), name)
    prep = config["preprocess_cfg"]
    text = class_text_features(model, make_tokenizer(config["model_cfg"]))
    out = {}
    for world in worlds:
        family, sizes = WORLDS[world]
        key = (world, prep["size"], tuple(prep["mean"]), tuple(prep["std"]))
        if key not in scenes:
            scenes[key] = make_eval_set(seed, n, (1, 1), *key[1:], family=family, size_range=sizes)
        data = scenes[key]
        image = F.normalize(model.encode_image(data.pixels).float(), dim=-1)
        pred, truth = (image @ text.T).argmax(-1), data.dominant
        out[world] = {
            "top1": round(float((pred == truth).float().mean()) * 100, 1),
            "colour": round(
                float((pred // len(SHAPES) == truth // len(SHAPES)).float().mean()) * 100, 1
            ),
            "shape": round(
                float((pred % len(SHAPES) == truth % len(SHAPES)).float().mean()) * 100, 1
            ),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", default=["reference", "reference-v2", "reference-v3"]
    )
    parser.add_argument("--n", type=int, default=300, help="scenes per world")
    parser.add_argument("--seed", type=int, default=777)
    parser.add_argument(
        "--worlds", nargs="+", choices=list(WORLDS), default=list(WORLDS), help="which worlds"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    scenes: dict[tuple, EvalSet] = {}
    result = {m: scores(m, args.n, args.seed, args.worlds, scenes) for m in args.models}
    print("| model | " + " | ".join(f"{w} top-1 / colour / shape" for w in args.worlds) + " |")
    print("|---|" + "---:|" * len(args.worlds))
    for m, per in result.items():
        cells = [f"{v['top1']} / {v['colour']} / {v['shape']}" for v in per.values()]
        print(f"| {m} | " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"n": args.n, "seed": args.seed, "models": result}, f, indent=1)


if __name__ == "__main__":
    main()
