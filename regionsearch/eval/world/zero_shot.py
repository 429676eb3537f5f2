"""Zero-shot classification of world scenes against the 64 class prompts.

The yardstick of the reference model's training: a quick single-object check during training
and the final held-out numbers recorded in the recipe JSON.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from regionsearch.eval.world.reference_model import WORLD_MEAN, WORLD_STD
from regionsearch.eval.world.scene import render_scene
from regionsearch.eval.world.scene_v2 import render_scene_v2
from regionsearch.eval.world.vocab import class_index, class_names

if TYPE_CHECKING:
    from regionsearch.eval.world.train_reference import TrainConfig

ZERO_SHOT_TEMPLATE = "a photo of a {}."
#: Object sizes (fraction of the short side) of the single-object zero-shot gate.
HELDOUT_SINGLE_SIZES = (0.15, 0.5)


@dataclass
class EvalSet:
    """Held-out scenes rendered at full size and resized like the backbone does (no crop)."""

    pixels: torch.Tensor
    dominant: torch.Tensor
    present: list[set[int]]


def make_eval_set(
    seed: int,
    n: int,
    n_objects: tuple[int, int],
    image_size: int,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    render_size: int = 224,
    family: str | None = None,
    size_range: tuple[float, float] | None = None,
) -> EvalSet:
    """Render ``n`` scenes at ``render_size``: world v1 by default, else a v2 ``family``.

    ``size_range`` overrides the object sizes (fraction of the short side) of a v2 family.
    """
    from regionsearch.backbone.preprocess import image_to_tensor

    rng = np.random.default_rng(seed)
    pixels, dominant, present = [], [], []
    for _ in range(n):
        if family is None:
            scene = render_scene(
                rng, render_size, min_objects=n_objects[0], max_objects=n_objects[1]
            )
        else:
            scene = render_scene_v2(
                rng,
                family,
                render_size,
                min_objects=n_objects[0],
                max_objects=n_objects[1],
                size_range=size_range,
            )
        pixels.append(image_to_tensor(scene.image, image_size, mean, std))
        ids = [class_index(o.colour, o.shape) for o in scene.objects]
        dominant.append(ids[int(np.argmax([o.area for o in scene.objects]))])
        present.append(set(ids))
    return EvalSet(torch.stack(pixels), torch.tensor(dominant), present)


@torch.no_grad()
def class_text_features(
    model: nn.Module, tokenizer: Any, template: str = ZERO_SHOT_TEMPLATE
) -> torch.Tensor:
    """Normalised text embeddings of the 64 class prompts through the full text tower."""
    model.eval()
    tokens = tokenizer([template.format(c) for c in class_names()])
    tokens = tokens.to(next(model.parameters()).device)
    return F.normalize(model.encode_text(tokens).float(), dim=-1)


@torch.no_grad()
def zero_shot(
    model: nn.Module, text_features: torch.Tensor, data: EvalSet, batch_size: int = 256
) -> dict[str, float]:
    """Top-1 accuracy against the dominant (largest visible) object, and hit-any-object rate."""
    model.eval()
    device = text_features.device
    preds = []
    for start in range(0, len(data.pixels), batch_size):
        pixels = data.pixels[start : start + batch_size].to(device)
        img = F.normalize(model.encode_image(pixels).float(), dim=-1)
        preds.append((img @ text_features.T).argmax(dim=-1).cpu())
    pred = torch.cat(preds)
    top1 = float((pred == data.dominant).float().mean())
    any_hit = float(
        np.mean([int(p) in s for p, s in zip(pred.tolist(), data.present, strict=True)])
    )
    return {"top1_dominant": round(top1, 4), "top1_any_object": round(any_hit, 4), "n": len(pred)}


def final_metrics(
    model: nn.Module, tokenizer: Any, cfg: TrainConfig, size: int, log: Any = print, n: int = 1000
) -> dict[str, Any]:
    """Zero-shot numbers through the full text tower on fresh held-out scenes (seed ``data_seed + 2``)."""
    text = class_text_features(model, tokenizer)
    single = make_eval_set(cfg.data_seed + 2, n, (1, 1), size, WORLD_MEAN, WORLD_STD)
    multi = make_eval_set(cfg.data_seed + 3, n, (2, 3), size, WORLD_MEAN, WORLD_STD)
    s, m = zero_shot(model, text, single), zero_shot(model, text, multi)
    log(f"final zero-shot: single {s} multi {m}")
    return {
        "zero_shot_single_object_top1": s["top1_dominant"],
        "zero_shot_multi_object_top1_dominant": m["top1_dominant"],
        "zero_shot_multi_object_top1_any": m["top1_any_object"],
        "zero_shot_n": n,
        "zero_shot_prompt": ZERO_SHOT_TEMPLATE,
        "eval_render_size": 224,
    }


def final_metrics_v2(
    model: nn.Module, tokenizer: Any, cfg: TrainConfig, size: int, log: Any = print, n: int = 500
) -> dict[str, Any]:
    """Zero-shot on the held-out family (the gate) and on fresh scenes of the training family."""
    text = class_text_features(model, tokenizer)
    out: dict[str, Any] = {}
    for family, seed in (("heldout", cfg.data_seed + 2), ("train", cfg.data_seed + 4)):
        single = make_eval_set(
            seed,
            n,
            (1, 1),
            size,
            WORLD_MEAN,
            WORLD_STD,
            family=family,
            size_range=HELDOUT_SINGLE_SIZES,
        )
        multi = make_eval_set(seed + 1, n, (2, 3), size, WORLD_MEAN, WORLD_STD, family=family)
        s, m = zero_shot(model, text, single), zero_shot(model, text, multi)
        log(f"final zero-shot on the {family} family: single {s} multi {m}")
        out[f"zero_shot_{family}_single_object_top1"] = s["top1_dominant"]
        out[f"zero_shot_{family}_multi_object_top1_dominant"] = m["top1_dominant"]
        out[f"zero_shot_{family}_multi_object_top1_any"] = m["top1_any_object"]
    out.update(
        {
            "zero_shot_n": n,
            "zero_shot_prompt": ZERO_SHOT_TEMPLATE,
            "zero_shot_single_sizes": list(HELDOUT_SINGLE_SIZES),
            "eval_render_size": 224,
        }
    )
    return out
