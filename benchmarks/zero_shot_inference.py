"""Does how a reference model is *run* move the held-out zero-shot gate? Input size, flip
averaging and a prompt ensemble, on the gate's single-object held-out scenes, by object-size
tercile.

    python benchmarks/zero_shot_inference.py --model reference-v8 --n 400 --seed 2025
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from regionsearch.backbone import ENSEMBLE_TEMPLATES, image_to_tensor, load_backbone
from regionsearch.eval.world.scene_v2 import render_scene_v2
from regionsearch.eval.world.vocab import class_index, class_names
from regionsearch.eval.world.zero_shot import HELDOUT_SINGLE_SIZES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="reference-v8")
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--seed", type=int, default=2025)
    parser.add_argument("--sizes", default="112,144,168,224", help="Input sizes to try.")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    backbone = load_backbone(args.model, device="cpu")
    rng = np.random.default_rng(args.seed)
    scenes = [
        render_scene_v2(rng, "heldout", 224, min_objects=1, max_objects=1,
                        size_range=HELDOUT_SINGLE_SIZES)
        for _ in range(args.n)
    ]  # fmt: skip
    truth = np.array([class_index(s.objects[0].colour, s.objects[0].shape) for s in scenes])
    area = np.array([s.objects[0].area / s.image.shape[0] / s.image.shape[1] for s in scenes])
    tercile = np.digitize(area, np.quantile(area, [1 / 3, 2 / 3]))
    texts = {
        "1 template": backbone.encode_text(class_names()),
        "ensemble": backbone.encode_text(class_names(), ENSEMBLE_TEMPLATES),
    }

    def encode(size: int, flip: bool) -> torch.Tensor:
        out = []
        for start in range(0, args.n, 100):
            chunk = scenes[start : start + 100]
            pixels = torch.stack(
                [image_to_tensor(s.image, size, backbone.mean, backbone.std) for s in chunk]
            )
            out.append(backbone.encode_images(pixels.flip(-1) if flip else pixels))
        return torch.cat(out)

    print(f"{args.model}: held-out single objects, n={args.n}, seed {args.seed}")
    print("| input px | images | prompts | top-1 % | small / middle / large tercile % |")
    print("|---:|---|---|---:|---|")
    for size in map(int, args.sizes.split(",")):
        tick = time.perf_counter()
        plain = encode(size, False)
        flipped = F.normalize(plain + encode(size, True), dim=-1)
        for images, vectors in (("plain", plain), ("+ flip", flipped)):
            for prompts, text in texts.items():
                right = ((vectors @ text.T).argmax(-1).numpy() == truth).astype(float)
                by = " / ".join(f"{100 * right[tercile == t].mean():.1f}" for t in range(3))
                print(f"| {size} | {images} | {prompts} | {100 * right.mean():.1f} | {by} |")
        print(f"<!-- {size} px: {time.perf_counter() - tick:.0f} s -->")


if __name__ == "__main__":
    main()
