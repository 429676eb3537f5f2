"""Fine-tune the Alpha-CLIP variant of the reference model on region-text pairs of the world.

Alpha-CLIP (Sun et al., 2024) tells the image tower *where* to look by adding a second patch
embedding of the alpha (mask) channel to the RGB patch embedding. ``conv1_alpha`` starts at
zero, so the fine-tune begins exactly at the base model and only learns how to use the mask;
the rest of the image tower moves at a lower learning rate, as in the paper. The text side
(frozen MiniLM + trained projection) stays fixed so the variant shares the base model's text
embedding space and its region vectors can be searched with the same text queries.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from regionsearch.eval.world.batches import (
    RENDER_CHUNK,
    CaptionPool,
    TrainingBatches,
    render_training_shard,
    same_colour_list,
)
from regionsearch.eval.world.reference_model import (
    build_model,
    load_trained_weights,
    make_tokenizer,
    write_fp16_weights,
    write_json,
)
from regionsearch.eval.world.region_negatives import negative_region
from regionsearch.eval.world.scene import render_scene
from regionsearch.eval.world.scene_v2 import render_scene_v2
from regionsearch.eval.world.vocab import class_index, class_names
from regionsearch.eval.world.worlds import world_family
from regionsearch.eval.world.zero_shot import ZERO_SHOT_TEMPLATE, class_text_features

#: Alpha normalisation of the Alpha-CLIP paper: ``(a - 0.5) / 0.26``.
ALPHA_MEAN = 0.5
ALPHA_STD = 0.26


def load_reference(
    models_dir: Path, name: str = "reference", load_text_weights: bool = True
) -> tuple[nn.Module, dict[str, Any]]:
    """The trained base model from ``models_dir/{name}.{json,safetensors}`` (eval mode);
    ``load_text_weights=False`` leaves the frozen MiniLM at random (its text side unusable)."""
    missing = [
        p
        for p in (models_dir / f"{name}.json", models_dir / f"{name}.safetensors")
        if not p.is_file()
    ]
    if missing:
        raise FileNotFoundError(
            f"no reference model {name!r} in {models_dir}: {', '.join(map(str, missing))} missing "
            "(pass --models DIR --name NAME as written by `regionsearch world train-reference`)"
        )
    config = json.loads((models_dir / f"{name}.json").read_text())
    model = build_model(config["model_cfg"], load_text_weights=load_text_weights)
    load_trained_weights(model, models_dir / f"{name}.safetensors")
    return model.eval(), config


def text_side_fingerprint(model: nn.Module) -> str:
    """SHA-1 of the trained text parameters (the projection; MiniLM itself is a fixed
    package): equal fingerprints mean equal class prompt vectors."""
    digest = hashlib.sha1()
    for key, value in sorted(model.state_dict().items()):
        if key.startswith("text.") and not key.startswith("text.transformer."):
            digest.update(key.encode())
            digest.update(value.detach().to("cpu", torch.float16).numpy().tobytes())
    return digest.hexdigest()


def save_class_text(model: nn.Module, tokenizer: Any, path: Path) -> Path:
    """The 64 class prompt vectors of ``model`` with its text fingerprint, for a fine-tune on a
    machine without MiniLM's weights (``--text-features``)."""
    text = class_text_features(model, tokenizer).cpu().numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, features=text, fingerprint=np.array(text_side_fingerprint(model)))
    return path


def load_class_text(path: Path, model: nn.Module) -> torch.Tensor:
    """The vectors :func:`save_class_text` wrote, refused unless they are ``model``'s own."""
    data = np.load(path)
    if not {"features", "fingerprint"} <= set(data.files):
        raise ValueError(f"{path} is not a class-prompt file (write it with save_class_text)")
    if str(data["fingerprint"]) != text_side_fingerprint(model):
        raise ValueError(
            f"{path} holds the class prompts of another text side than this model's; "
            "write them from this model (benchmarks/gpu/prepare.sh)"
        )
    return F.normalize(torch.from_numpy(data["features"]).float(), dim=-1)


class AlphaInput:
    """Adds ``conv1_alpha(alpha)`` to ``conv1(rgb)`` through a forward hook on ``visual.conv1``.

    A hook keeps the parameter names of the stock open_clip tower (``visual.conv1.weight``,
    ``visual.conv1_alpha.weight``), which is what the backbone loader and the region embedders
    expect. Set ``alpha`` (B, 1, S, S), already normalised, before calling the tower; ``None``
    means "no alpha" (the base model's behaviour).
    """

    def __init__(self, visual: nn.Module) -> None:
        if not hasattr(visual, "conv1_alpha"):
            conv = visual.conv1
            visual.conv1_alpha = nn.Conv2d(
                1,
                conv.out_channels,
                conv.kernel_size,
                stride=conv.stride,
                bias=False,
                device=conv.weight.device,
                dtype=conv.weight.dtype,
            )
            nn.init.zeros_(visual.conv1_alpha.weight)
        self.visual = visual
        self.alpha: torch.Tensor | None = None
        self._handle = visual.conv1.register_forward_hook(self._hook)

    def _hook(
        self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor
    ) -> torch.Tensor:
        if self.alpha is None:
            return output
        return output + self.visual.conv1_alpha(self.alpha.to(output.dtype))

    def encode(self, model: nn.Module, pixels: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """Image embeddings (not normalised) of ``pixels`` looking at ``alpha`` (raw, in [0, 1])."""
        self.alpha = (alpha - ALPHA_MEAN) / ALPHA_STD
        try:
            return model.encode_image(pixels)
        finally:
            self.alpha = None


@dataclass
class AlphaConfig:
    """Knobs of the Alpha-CLIP fine-tune."""

    steps: int = 600
    minutes: float | None = 14.0
    seed: int = 0
    data_seed: int = 4321
    batch_size: int = 96
    lr_alpha: float = 2e-3
    lr_tower: float = 2e-4
    warmup_steps: int = 20
    n_scenes: int = 12000
    whole_image_frac: float = 0.1
    n_eval_scenes: int = 300
    cache_dir: str = "runs/world-alphaclip"
    #: ``v1``, ``v2`` or ``v2dr``: v2 trains on the ``train`` family (half the class lists share
    #: a colour), v2dr on the domain-randomised ``train-dr`` one; both evaluate on ``heldout``.
    world: str = "v1"
    #: Base model ``{name}.json``/``.safetensors`` in the models folder.
    name: str = "reference"
    #: Share of batch items whose mask is replaced by a non-object region (background blob or
    #: object plus background, :mod:`~regionsearch.eval.world.region_negatives`) with a "none"
    #: target: a learned cosine threshold every class prompt must stay under. 0 = objects only.
    negative_frac: float = 0.0
    #: Torch device of the model and of every batch. The shard stays on the host: negatives
    #: are cut from its masks there, and a batch of 64 regions is ~10 MB on the bus.
    device: str = "cpu"
    #: Processes rendering the shard (> 1: chunked seeds, see ``render_training_shard``).
    render_workers: int = 1
    #: Class prompt vectors from :func:`save_class_text` (``.npz``): the base model is then
    #: built without MiniLM's weights, which a GPU machine may lack.
    text_features: str | None = None


@dataclass
class RegionEval:
    """Held-out region classification set: full images, per-object masks, crops, labels."""

    pixels: torch.Tensor
    alphas: torch.Tensor
    crops: torch.Tensor
    labels: torch.Tensor


def make_region_eval(
    seed: int,
    n_scenes: int,
    image_size: int,
    mean: tuple,
    std: tuple,
    render_size: int = 224,
    family: str | None = None,
) -> RegionEval:
    """2-4-object scenes at ``render_size``; one item per object (image, mask, bbox crop, class).

    ``family`` renders world-v2 scenes of that family instead of version-1 ones.
    """
    from regionsearch.backbone.preprocess import image_to_tensor, resize_masks

    rng = np.random.default_rng(seed)
    pixels, alphas, crops, labels = [], [], [], []
    for _ in range(n_scenes):
        if family is None:
            scene = render_scene(rng, render_size, min_objects=2, max_objects=4)
        else:
            scene = render_scene_v2(rng, family, render_size, min_objects=2, max_objects=4)
        full = image_to_tensor(scene.image, image_size, mean, std)
        masks = resize_masks(torch.from_numpy(scene.masks).float(), image_size)
        for k, obj in enumerate(scene.objects):
            x, y, w, h = obj.bbox
            pad = int(0.1 * max(w, h)) + 2
            crop = scene.image[max(0, y - pad) : y + h + pad, max(0, x - pad) : x + w + pad]
            pixels.append(full)
            alphas.append(masks[k : k + 1])
            crops.append(image_to_tensor(crop, image_size, mean, std))
            labels.append(class_index(obj.colour, obj.shape))
    return RegionEval(
        torch.stack(pixels), torch.stack(alphas), torch.stack(crops), torch.tensor(labels)
    )


@torch.no_grad()
def region_metrics(
    model: nn.Module, alpha_in: AlphaInput, text: torch.Tensor, data: RegionEval, bs: int = 256
) -> dict[str, float]:
    """Top-1 over 64 classes: Alpha-CLIP with the mask, plain model on the crop, plain on the full image."""
    model.eval()
    on = text.device
    hits = {"alphaclip_mask": 0, "plain_crop": 0, "plain_full_image": 0}
    for s in range(0, len(data.labels), bs):
        sl = slice(s, s + bs)
        y = data.labels[sl].to(on)
        pixels, alphas = data.pixels[sl].to(on), data.alphas[sl].to(on)
        a = F.normalize(alpha_in.encode(model, pixels, alphas).float(), dim=-1)
        c = F.normalize(model.encode_image(data.crops[sl].to(on)).float(), dim=-1)
        f = F.normalize(model.encode_image(pixels).float(), dim=-1)
        hits["alphaclip_mask"] += int(((a @ text.T).argmax(-1) == y).sum())
        hits["plain_crop"] += int(((c @ text.T).argmax(-1) == y).sum())
        hits["plain_full_image"] += int(((f @ text.T).argmax(-1) == y).sum())
    n = len(data.labels)
    return {**{k: round(v / n, 4) for k, v in hits.items()}, "n_regions": n}


def save_alphaclip(
    model: nn.Module, models_dir: Path, record: dict[str, Any], name: str = "reference"
) -> None:
    """Write ``{name}-alphaclip.safetensors`` (visual tower + conv1_alpha, fp16) and the record
    into ``{name}.json``."""
    state = {f"visual.{k}": v for k, v in model.visual.state_dict().items()}
    write_fp16_weights(state, models_dir / f"{name}-alphaclip.safetensors")
    json_path = models_dir / f"{name}.json"
    doc = json.loads(json_path.read_text())
    doc["alphaclip"] = record
    write_json(doc, json_path)


def train_alphaclip(
    cfg: AlphaConfig,
    models_dir: Path,
    log: Callable[[str], Any] = print,
    command: str | None = None,
) -> dict[str, Any]:
    """Fine-tune and save the variant; returns its JSON record."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    world_family(cfg.world)  # an unknown world fails before anything loads
    model, config = load_reference(
        models_dir, cfg.name, load_text_weights=cfg.text_features is None
    )
    device = torch.device(cfg.device)
    model.to(device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    tokenizer = make_tokenizer(config["model_cfg"])
    mean = tuple(config["preprocess_cfg"]["mean"])
    std = tuple(config["preprocess_cfg"]["std"])
    size = int(config["preprocess_cfg"]["size"])
    # (64, D), fixed: the text side is not trained.
    if cfg.text_features:
        text = load_class_text(Path(cfg.text_features), model).to(device)
    else:
        text = class_text_features(model, tokenizer)
    model.requires_grad_(False)
    alpha_in = AlphaInput(model.visual)
    model.visual.requires_grad_(True)

    v2 = world_family(cfg.world) is not None
    pool = _region_pool(cfg.data_seed, same_colour_share=0.5 if v2 else 0.0)
    tag = f"-{cfg.world}" if v2 else ""
    tag += f"-chunk{RENDER_CHUNK}" if cfg.render_workers > 1 else ""
    shard_dir = Path(cfg.cache_dir) / f"regions-s{size}-n{cfg.n_scenes}-seed{cfg.data_seed}{tag}"
    if not (shard_dir / "shard.npz").is_file():
        t0 = time.time()
        render_training_shard(
            shard_dir,
            pool,
            cfg.n_scenes,
            cfg.data_seed,
            size,
            multi_size_range=(0.08, 0.45) if v2 else (0.18, 0.45),
            with_masks=True,
            world=cfg.world,
            workers=cfg.render_workers,
        )
        log(f"rendered {cfg.n_scenes} region scenes in {time.time() - t0:.0f}s")
    data = TrainingBatches(shard_dir / "shard.npz", pool, mean, std)
    eval_set = make_region_eval(
        cfg.data_seed + 1, cfg.n_eval_scenes, size, mean, std, family="heldout" if v2 else None
    )
    before = region_metrics(model, alpha_in, text, eval_set)
    log(f"before fine-tune: {before}")

    alpha_params = [model.visual.conv1_alpha.weight]
    # The "none" logit's cosine: where non-object regions must stay below every class prompt
    # and objects must rise above it; a training-time parameter only (not saved).
    none_cos = nn.Parameter(torch.tensor(0.3, device=device))
    if cfg.negative_frac:
        alpha_params.append(none_cos)
    tower = [p for n, p in model.visual.named_parameters() if not n.startswith("conv1_alpha")]
    opt = torch.optim.AdamW(
        [
            {"params": alpha_params, "lr": cfg.lr_alpha, "base": cfg.lr_alpha, "weight_decay": 0.0},
            {"params": tower, "lr": cfg.lr_tower, "base": cfg.lr_tower, "weight_decay": 0.05},
        ],
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    scale = model.logit_scale.exp().detach()
    t0 = time.time()
    step, curve, window = 0, [], []
    n_valid = (data.classes >= 0).sum(dim=1).numpy()
    all_idx = np.arange(len(data))
    while step < cfg.steps:
        progress = step / cfg.steps
        if cfg.minutes:
            progress = max(progress, (time.time() - t0) / (cfg.minutes * 60))
        if progress >= 1.0:
            break
        model.train()
        idx = rng.choice(all_idx, size=cfg.batch_size)
        obj = (rng.random(cfg.batch_size) * n_valid[idx]).astype(np.int64)
        scene_masks = data.masks_for(idx)  # unpacked once: the object and any negative use it
        masks = scene_masks[np.arange(cfg.batch_size), obj].float()[:, None]
        labels = data.classes[torch.from_numpy(idx), torch.from_numpy(obj)]
        # Some whole-image alphas on single-object scenes keep the plain behaviour intact.
        whole = torch.from_numpy(
            (rng.random(cfg.batch_size) < cfg.whole_image_frac) & (n_valid[idx] == 1)
        )
        masks[whole] = 1.0
        if cfg.negative_frac:
            labels = _with_negatives(
                rng, scene_masks.numpy(), obj, n_valid[idx], masks, labels, whole, cfg.negative_frac
            )
        flip = torch.from_numpy(rng.random(cfg.batch_size) < 0.5)
        images = data.images_for(idx)
        images[flip] = images[flip].flip(-1)
        masks[flip] = masks[flip].flip(-1)
        images, masks, labels = images.to(device), masks.to(device), labels.to(device)
        emb = F.normalize(alpha_in.encode(model, images, masks), dim=-1)
        logits = scale * emb @ text.T
        if cfg.negative_frac:
            logits = torch.cat([logits, (scale * none_cos).expand(len(logits), 1)], dim=1)
        loss = F.cross_entropy(logits, labels)
        warm = min(1.0, (step + 1) / cfg.warmup_steps)
        cosine = 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        for group in opt.param_groups:
            group["lr"] = group["base"] * warm * cosine
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.visual.parameters(), 1.0)
        opt.step()
        step += 1
        window.append(float(loss.detach()))
        if step % 10 == 0:
            curve.append(
                {
                    "step": step,
                    "loss": round(float(np.mean(window)), 4),
                    "t": round(time.time() - t0, 1),
                }
            )
            log(
                f"alpha step {step} loss {np.mean(window):.4f} {(time.time() - t0) / step:.2f}s/step"
            )
            window = []
    wall = time.time() - t0
    after = region_metrics(model, alpha_in, text, eval_set)
    log(f"after fine-tune: {after}")
    record = {
        "weights": f"{cfg.name}-alphaclip.safetensors",
        "alpha_mean": ALPHA_MEAN,
        "alpha_std": ALPHA_STD,
        "trained": "visual.conv1_alpha (lr_alpha) + the rest of the visual tower (lr_tower); text side frozen",
        "steps": step,
        "wall_seconds": round(wall, 1),
        "seconds_per_step": round(wall / max(step, 1), 3),
        "batch_size": cfg.batch_size,
        "lr_alpha": cfg.lr_alpha,
        "lr_tower": cfg.lr_tower,
        "data_seed": cfg.data_seed,
        "n_scenes": cfg.n_scenes,
        "world": cfg.world,
        "negative_frac": cfg.negative_frac,
        "device": device_name,
        "text_features": cfg.text_features,
        **({"none_cos": round(float(none_cos.detach()), 4)} if cfg.negative_frac else {}),
        "loss_curve": curve,
        "region_top1_before": before,
        "region_top1": after,
        "eval": f"{after['n_regions']} objects of {cfg.n_eval_scenes} held-out 2-4-object scenes at 224 px"
        + (" (v2 heldout family)" if v2 else "")
        + ", "
        f"64-way with prompt {ZERO_SHOT_TEMPLATE!r}",
        "command": command,
    }
    save_alphaclip(model, models_dir, record, cfg.name)
    return record


def _with_negatives(
    rng: np.random.Generator,
    objects: np.ndarray,
    obj: np.ndarray,
    n_valid: np.ndarray,
    masks: torch.Tensor,
    labels: torch.Tensor,
    whole: torch.Tensor,
    negative_frac: float,
) -> torch.Tensor:
    """Swap a share of the batch's object masks (in place) for non-object regions; returns the
    labels with those items' target set to the "none" class (index 64, after the classes)."""
    labels = labels.clone()
    none_class = len(class_names())
    chosen = (rng.random(len(obj)) < negative_frac) & ~whole.numpy()
    for i in np.nonzero(chosen)[0]:
        region = negative_region(rng, objects[i, : n_valid[i]], int(obj[i]))
        if region is not None:
            masks[i, 0] = torch.from_numpy(region).float()
            labels[i] = none_class
    return labels


def _region_pool(seed: int, same_colour_share: float = 0.0) -> CaptionPool:
    """Random class lists (no captions needed: region targets are class prompts).

    ``same_colour_share`` of the multi-object lists give one colour to several shapes.
    """
    rng = np.random.default_rng(seed)
    entries, group = [], []
    for g, (lo, hi) in enumerate(((1, 1), (2, 3), (4, 6))):
        for _ in range(2000 if g else 64):
            n = int(rng.integers(lo, hi + 1))
            if g and rng.random() < same_colour_share:
                entries.append(same_colour_list(rng, n))
                group.append(g)
                continue
            entries.append([int(c) for c in rng.choice(len(class_names()), size=n, replace=False)])
            group.append(g)
    return CaptionPool(entries, [], [[] for _ in entries], [-1] * len(entries), group)
