"""Does averaging the training prompt templates help single-object zero-shot?

Scores a bundled reference model with each single-object training template
(``SINGLE_TEMPLATES``) and with the mean of their text embeddings, on fresh scenes of a world v2
family (the same scenes for every prompt)::

    python benchmarks/prompt_ensemble.py --model reference-v8 --n 600 --seed 2025
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from regionsearch.backbone.loading import bundled_models_dir
from regionsearch.eval.world.batches import SINGLE_TEMPLATES
from regionsearch.eval.world.reference_model import make_tokenizer
from regionsearch.eval.world.train_alphaclip import load_reference
from regionsearch.eval.world.zero_shot import (
    HELDOUT_SINGLE_SIZES,
    class_text_features,
    make_eval_set,
)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="reference-v8")
    parser.add_argument("--n", type=int, default=600, help="scenes per family")
    parser.add_argument("--seed", type=int, default=2025)
    parser.add_argument("--families", nargs="+", default=["heldout", "train-dr"])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, config = load_reference(bundled_models_dir(), args.model)
    tokenizer, prep = make_tokenizer(config["model_cfg"]), config["preprocess_cfg"]
    text = {t: class_text_features(model, tokenizer, t) for t in SINGLE_TEMPLATES}
    text["mean of all templates"] = F.normalize(torch.stack(list(text.values())).mean(0), dim=-1)
    print("| prompt | " + " | ".join(f"{f} top-1 %" for f in args.families) + " |")
    print("|---|" + "---:|" * len(args.families))
    cells: dict[str, list[str]] = {name: [] for name in text}
    for family in args.families:
        data = make_eval_set(
            args.seed,
            args.n,
            (1, 1),
            prep["size"],
            tuple(prep["mean"]),
            tuple(prep["std"]),
            family=family,
            size_range=HELDOUT_SINGLE_SIZES,
        )
        # one image pass for every prompt (zero_shot() would encode the images once per prompt)
        image = F.normalize(model.encode_image(data.pixels).float(), dim=-1)
        for name, features in text.items():
            hit = (image @ features.T).argmax(-1) == data.dominant
            cells[name].append(f"{float(hit.float().mean()) * 100:.1f}")
    for name, row in cells.items():
        print(f"| {name} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
