"""Which half of a world class name does each embedder get right: the colour or the shape?

Every ground-truth mask of a held-out world split ranks the 64 class names (``"{colour}
{shape}"``, with the model's prompt template); the top class is then checked part by part. An
embedder that localizes colour but not shape (MaskInversion on the 96-px reference model) shows
a high colour and a low shape score.

    python benchmarks/world_attributes.py --scenes 100 --embedders maskinversion masked-crop global
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from regionsearch.backbone import Backbone  # noqa: E402
from regionsearch.embedders import get_embedder  # noqa: E402
from regionsearch.eval.datasets import RegionDataset  # noqa: E402
from regionsearch.eval.runner import TextCache, class_templates  # noqa: E402
from regionsearch.eval.world_split import heldout_world  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=100)
    parser.add_argument(
        "--embedders", nargs="+", default=["maskinversion", "alphaclip", "masked-crop", "global"]
    )
    parser.add_argument("--model", default="reference")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    dataset = RegionDataset.from_world(heldout_world(args.scenes))
    backbone = Backbone.load(args.model)
    names = dataset.class_names
    texts = TextCache(backbone).encode(names, class_templates(backbone))
    colour, shape = zip(*(n.split(" ", 1) for n in names), strict=True)
    colour, shape = np.asarray(colour), np.asarray(shape)
    images = list(dataset)
    labels = np.concatenate([item.labels for item in images])

    rows = []
    print("| embedder | colour right | shape right | both right | masks |")
    print("|---|---:|---:|---:|---:|")
    for name in args.embedders:
        embedder = get_embedder(name, backbone)
        vectors = torch.cat([embedder.embed(item.image, item.masks) for item in images])
        top = (vectors @ texts.T).argmax(1).numpy()
        row = {
            "embedder": name,
            "colour": float((colour[top] == colour[labels]).mean()),
            "shape": float((shape[top] == shape[labels]).mean()),
            "both": float((top == labels).mean()),
            "masks": len(labels),
        }
        rows.append(row)
        print(
            f"| {name} | {100 * row['colour']:.1f} | {100 * row['shape']:.1f} "
            f"| {100 * row['both']:.1f} | {row['masks']} |",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
