"""Does a reference model fail to generalise, or fail to fit? Single-object zero-shot by factor.

1. The held-out family with one ingredient swapped at a time (fills, background, canvas,
   degradations) and the model's own ``train-dr`` family: which ingredient costs accuracy.
2. Shape accuracy by object size on flat scenes (flat background, flat fills).
3. With ``--shard``: single-object scenes of the training shard against fresh scenes of the same
   family (overfitting shows as a gap; underfitting as both low).

    python benchmarks/underfit_diagnosis.py --model reference-v3 \
        --shard runs/world-train-v3/shard-s112-n30000-p4000-seed1234-v2dr-sc0.5-masks/shard.npz
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools

import numpy as np
import torch
import torch.nn.functional as F

from regionsearch.backbone.loading import bundled_models_dir
from regionsearch.backbone.preprocess import image_to_tensor
from regionsearch.eval.world.batches import square_scene
from regionsearch.eval.world.reference_model import make_tokenizer
from regionsearch.eval.world.scene_v2 import FAMILIES, TRAIN_BACKGROUNDS, render_scene_v2
from regionsearch.eval.world.train_alphaclip import load_reference
from regionsearch.eval.world.vocab import COLOUR_NAMES, SHAPES, class_index
from regionsearch.eval.world.zero_shot import class_text_features

S = len(SHAPES)


def _scores(model, text, pixels: torch.Tensor, truth: list[int]) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        image = F.normalize(model.encode_image(pixels).float(), dim=-1)
    pred, t = (image @ text.T).argmax(-1).numpy(), np.asarray(truth)
    return pred, t


def _row(name: str, pred: np.ndarray, t: np.ndarray) -> str:
    top1, colour, shape = (
        (pred == t).mean(),
        (pred // S == t // S).mean(),
        (pred % S == t % S).mean(),
    )
    return f"| {name} | {top1 * 100:.1f} | {colour * 100:.1f} | {shape * 100:.1f} |"


def _render(family, n: int, seed: int, prep: dict) -> tuple[torch.Tensor, list[int], list[float]]:
    rng = np.random.default_rng(seed)
    pixels, truth, area = [], [], []
    for _ in range(n):
        scene = render_scene_v2(rng, family, 224, n_objects=1, size_range=(0.15, 0.5))
        pixels.append(image_to_tensor(scene.image, prep["size"], prep["mean"], prep["std"]))
        truth.append(class_index(scene.objects[0].colour, scene.objects[0].shape))
        area.append(scene.objects[0].area / (scene.image.shape[0] * scene.image.shape[1]))
    return torch.stack(pixels), truth, area


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="reference-v3")
    parser.add_argument("--n", type=int, default=300, help="scenes per row")
    parser.add_argument("--seed", type=int, default=777)
    parser.add_argument("--shard", help="training shard.npz (rendered with masks) for part 3")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, config = load_reference(bundled_models_dir(), args.model)
    prep = config["preprocess_cfg"]
    text = class_text_features(model, make_tokenizer(config["model_cfg"]))
    held = FAMILIES["heldout"]
    variants = {
        "held-out family": held,
        "held-out, flat fills": dataclasses.replace(held, patterns=("flat",), pattern_weights=(1,)),
        "held-out, dots fills only": dataclasses.replace(
            held, patterns=("dots",), pattern_weights=(1,)
        ),
        "held-out, checks fills only (a train-dr fill)": dataclasses.replace(
            held, patterns=("checks",), pattern_weights=(1,)
        ),
        "held-out, checks fills, flat background": dataclasses.replace(
            held, patterns=("checks",), pattern_weights=(1,), backgrounds=("flat",)
        ),
        "held-out, flat background": dataclasses.replace(held, backgrounds=("flat",)),
        "held-out, v2 train backgrounds": dataclasses.replace(held, backgrounds=TRAIN_BACKGROUNDS),
        "held-out, square canvas": dataclasses.replace(held, aspect=(1.0, 1.0)),
        "held-out, no degradations": dataclasses.replace(held, degrade_prob=0.0),
        "train-dr": FAMILIES["train-dr"],
        "train-dr, checks fills only": dataclasses.replace(
            FAMILIES["train-dr"], patterns=("checks",), pattern_weights=(1,)
        ),
    }
    print(
        f"| {args.model}, {args.n} scenes | top-1 | right colour | right shape |\n|---|---:|---:|---:|"
    )
    for name, family in variants.items():
        pixels, truth, _ = _render(family, args.n, args.seed, prep)
        print(_row(name, *_scores(model, text, pixels, truth)))

    flat = dataclasses.replace(
        held, backgrounds=("flat",), patterns=("flat",), pattern_weights=(1,)
    )
    pixels, truth, area = _render(flat, 2 * args.n, args.seed + 1, prep)
    pred, t = _scores(model, text, pixels, truth)
    edges = np.quantile(area, [0, 1 / 3, 2 / 3, 1])
    for lo, hi in itertools.pairwise(edges):
        keep = (np.asarray(area) >= lo) & (np.asarray(area) <= hi)
        right = (pred[keep] % S == t[keep] % S).mean() * 100
        print(
            f"flat scenes, objects {lo * 100:.1f}-{hi * 100:.1f}% of the image: shape {right:.1f}"
        )

    if args.shard:
        data = np.load(args.shard)
        idx = np.arange(0, len(data["entry"]), 3)[: 2 * args.n]  # every third scene: one object
        mean = torch.tensor(prep["mean"]).view(1, 3, 1, 1)
        std = torch.tensor(prep["std"]).view(1, 3, 1, 1)
        seen = (
            torch.from_numpy(data["images"][idx]).permute(0, 3, 1, 2).float() / 255 - mean
        ) / std
        pred, t = _scores(model, text, seen, data["classes"][idx, 0].astype(int).tolist())
        print(_row("training shard, single objects (seen)", pred, t))
        rng, fresh, truth = np.random.default_rng(4242), [], []
        size = prep["size"]
        while len(fresh) < 2 * args.n:
            c = int(rng.integers(64))
            pair = [(COLOUR_NAMES[c // S], SHAPES[c % S])]
            scene = render_scene_v2(rng, "train-dr", size, classes=pair, size_range=(0.06, 0.7))
            scene = square_scene(scene, size)
            if len(scene.objects) == 1:
                fresh.append(torch.from_numpy(np.array(scene.image)).permute(2, 0, 1).float() / 255)
                truth.append(c)
        pred, t = _scores(model, text, (torch.stack(fresh) - mean) / std, truth)
        print(_row("fresh train-dr single objects (unseen)", pred, t))


if __name__ == "__main__":
    main()
