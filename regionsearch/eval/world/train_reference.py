"""Train the bundled reference CLIP on the synthetic world (CPU, about an hour).

No pretrained CLIP can be downloaded here, so the project ships its own: an open_clip
``CustomTextCLIP`` with a small standard ViT image tower (the architecture the region embedders
drive) and a *frozen* all-MiniLM-L6-v2 text tower of which only the projection is trained.

What makes it trainable on two CPU cores in an hour:

- the frozen text tower runs once: every caption of the pool is encoded up front and a step only
  applies the trainable projection to cached features;
- scenes are pre-rendered (``batches.py``), small (64 px, patch 8 -> 8x8 tokens);
- besides the in-batch contrastive loss, every image is scored against the 64 class prompts
  ("a photo of a {class}.") with an area-weighted target, and multi-object captions come with a
  one-attribute hard negative: both give dense, hard-negative-rich gradients;
- the learning-rate schedule and the object-count curriculum follow *progress*, the larger of
  step and wall-clock fractions, so a run cut short by a time limit still anneals properly.

The model and its files are in :mod:`~regionsearch.eval.world.reference_model`, the zero-shot
yardstick in :mod:`~regionsearch.eval.world.zero_shot`, the resumable state of a run in
:mod:`~regionsearch.eval.world.train_checkpoint`; this module holds the loss and the loop.
"""

from __future__ import annotations

import hashlib
import json
import math
import shlex
import sys
import time
from dataclasses import dataclass, field
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
    build_caption_pool,
    curriculum_weights,
    render_training_shard,
)
from regionsearch.eval.world.reference_model import (
    WORLD_MEAN,
    WORLD_STD,
    build_model,
    load_init_weights,
    make_tokenizer,
    reference_model_cfg,
    save_reference,
)
from regionsearch.eval.world.train_checkpoint import Resumed, load_checkpoint, save_checkpoint
from regionsearch.eval.world.train_losses import training_loss
from regionsearch.eval.world.vocab import class_names
from regionsearch.eval.world.worlds import world_family
from regionsearch.eval.world.zero_shot import (
    HELDOUT_SINGLE_SIZES,
    final_metrics,
    final_metrics_v2,
    make_eval_set,
    zero_shot,
)


@torch.no_grad()
def encode_pooled_texts(
    model: nn.Module, tokenizer: Any, texts: list[str], batch_size: int = 256
) -> torch.Tensor:
    """Mean-pooled MiniLM features (before the trainable projection) of ``texts``.

    Batches are padded to their longest member, not to the context length: the mean pooler
    ignores padding, so the result is the same as the tower's own forward, only faster.
    """
    text = model.text
    text.eval()
    hf_tok = tokenizer.tokenizer
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.zeros(len(texts), text.transformer.config.hidden_size)
    for start in range(0, len(texts), batch_size):
        idx = order[start : start + batch_size]
        enc = hf_tok(
            [texts[i] for i in idx],
            padding="longest",
            truncation=True,
            max_length=tokenizer.context_length,
            return_tensors="pt",
        )
        hidden = text.transformer(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        out[idx] = text.pooler(hidden, enc["attention_mask"]).float()
    return out


@dataclass
class TrainConfig:
    """Knobs of one training run (recorded in the JSON beside the weights)."""

    steps: int = 3000
    minutes: float | None = 55.0
    seed: int = 0
    data_seed: int = 1234
    batch_size: int = 128
    lr: float = 1.5e-3
    weight_decay: float = 0.05
    warmup_steps: int = 60
    n_scenes: int = 60000
    n_multi_captions: int = 8000
    eval_every: int = 100
    checkpoint_every: int = 100
    n_eval: int = 256
    model: dict[str, Any] = field(default_factory=reference_model_cfg)
    cache_dir: str = "runs/world-train"
    #: Continue from these weights (a ``reference.safetensors``) instead of a fresh init.
    init_from: str | None = None
    #: Insert identity blocks when the model is deeper than ``init_from`` (function-preserving).
    grow: bool = False
    #: Where the object-count curriculum starts (0 = beginning, 1 = the late, multi-object mix).
    curriculum_start: float = 0.0
    #: ``v1`` (flat colours, muted backgrounds), ``v2`` (the ``train`` family of scene_v2) or
    #: ``v2dr`` (its domain-randomised ``train-dr`` family); see ``worlds.TRAINING_WORLDS``.
    world: str = "v1"
    #: Share of multi-object captions whose objects share a colour, and of shape-only negatives.
    same_colour_share: float = 0.0
    shape_negative_share: float = 0.5
    #: Object sizes (fraction of the short side) of single- and multi-object training scenes.
    single_size_range: tuple[float, float] = (0.15, 0.75)
    multi_size_range: tuple[float, float] = (0.15, 0.45)
    #: Keep the text projection fixed (a later phase): text vectors stay where they were, so an
    #: Alpha-CLIP variant trained against them and stored text vectors remain valid.
    freeze_text_proj: bool = False
    #: Weight of the dense patch-class loss (0 = off); on, shards are rendered with masks.
    dense_weight: float = 0.0
    #: Weight of the background term (patches no object touches favour no class prompt).
    background_weight: float = 0.0
    #: Resumable checkpoint (model, optimiser, step, RNG); ``None`` = ``{cache_dir}/resume.pt``.
    checkpoint: str | None = None
    #: Log (and record the loss curve) every this many steps.
    log_every: int = 20
    #: Zero-shot sets at the end (minutes of rendering; tests switch it off), scenes per set.
    final_eval: bool = True
    n_final: int = 500
    #: Where the model and the whole shard live during training (``cuda`` on a GPU machine).
    device: str = "cpu"
    #: Build the frozen MiniLM without its weights (a GPU machine need not carry them): only
    #: with the caption features already cached and no final evaluation, which would read them.
    #: Its random init draws from torch's RNG, so such a run is not seed-identical to one with.
    load_text_weights: bool = True
    #: Processes rendering the shard (> 1: chunked seeds, see ``render_training_shard``).
    render_workers: int = 1


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if (
            p.ndim < 2
            or "positional_embedding" in name
            or "class_embedding" in name
            or "logit_scale" in name
        ):
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def lr_at(progress: float, step: int, cfg: TrainConfig) -> float:
    """Linear warmup over ``warmup_steps`` then cosine decay to 2% along ``progress``."""
    warm = min(1.0, (step + 1) / max(cfg.warmup_steps, 1))
    cosine = 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.lr * warm * cosine


def prepare_data(cfg: TrainConfig, log: Any = print) -> tuple[CaptionPool, Path]:
    """Caption pool and rendered shard, reused from ``cache_dir`` when already there."""
    pool = build_caption_pool(
        cfg.data_seed, cfg.n_multi_captions, cfg.same_colour_share, cfg.shape_negative_share
    )
    size = cfg.model["vision_cfg"]["image_size"]
    tag = "" if cfg.world == "v1" else f"-{cfg.world}-sc{cfg.same_colour_share}"
    tag += "-masks" if cfg.dense_weight > 0 else ""
    tag += f"-chunk{RENDER_CHUNK}" if cfg.render_workers > 1 else ""
    shard_dir = (
        Path(cfg.cache_dir)
        / f"shard-s{size}-n{cfg.n_scenes}-p{cfg.n_multi_captions}-seed{cfg.data_seed}{tag}"
    )
    shard = shard_dir / "shard.npz"
    if not shard.is_file():
        t0 = time.time()
        render_training_shard(
            shard_dir,
            pool,
            cfg.n_scenes,
            cfg.data_seed,
            size,
            single_size_range=cfg.single_size_range,
            multi_size_range=cfg.multi_size_range,
            world=cfg.world,
            with_masks=cfg.dense_weight > 0,
            workers=cfg.render_workers,
        )
        log(f"rendered {cfg.n_scenes} scenes in {time.time() - t0:.0f}s")
    return pool, shard


def text_features_path(pool: CaptionPool, shard: Path) -> Path:
    """Where the pooled MiniLM features of ``pool`` are cached: beside the shards (not inside
    one), since shards of other image sizes share the captions."""
    digest = hashlib.sha1("\n".join(pool.texts).encode()).hexdigest()[:12]
    return shard.parent.parent / f"text-feats-{len(pool.texts)}-{digest}.npy"


def cached_text_features(
    model: nn.Module, tokenizer: Any, pool: CaptionPool, shard: Path, log: Any = print
) -> torch.Tensor:
    """Pooled MiniLM features of every pool caption, cached as ``.npy`` beside the shard."""
    path = text_features_path(pool, shard)
    if path.is_file():
        return torch.from_numpy(np.load(path))
    t0 = time.time()
    feats = encode_pooled_texts(model, tokenizer, pool.texts)
    np.save(path, feats.numpy())
    log(f"encoded {len(pool.texts)} captions in {time.time() - t0:.0f}s")
    return feats


class TextWeightsNeeded(ValueError):
    """A run asked to skip the MiniLM weights would need them."""


def check_text_free(cfg: TrainConfig, features: Path) -> None:
    """Refuse a run without MiniLM weights that would need them."""
    if cfg.final_eval:
        raise TextWeightsNeeded(
            "training without the MiniLM weights needs the final evaluation off"
        )
    if not features.is_file():
        raise TextWeightsNeeded(
            f"training without the MiniLM weights needs the caption features cached at {features}"
        )


def train_reference(
    cfg: TrainConfig,
    out_dir: Path | None,
    log: Any = print,
    command: str | None = None,
    name: str = "reference",
) -> dict[str, Any]:
    """Run the training; checkpoints into ``out_dir`` every ``checkpoint_every`` steps.

    A run that is killed continues from ``cfg.checkpoint`` (model, optimiser, step, RNG and the
    training time so far) when started again with the same command. Returns the ``training``
    record (also written into ``out_dir/{name}.json``).
    """
    world_family(cfg.world)  # an unknown world fails before the model is built
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    t_start = time.time()
    pool, shard = prepare_data(cfg, log)
    if not cfg.load_text_weights:
        check_text_free(cfg, text_features_path(pool, shard))
        log("MiniLM built without its weights: the caption features are cached")
    model = build_model(cfg.model, load_text_weights=cfg.load_text_weights)
    previous_phase = (
        load_init_weights(model, Path(cfg.init_from), log, grow=cfg.grow) if cfg.init_from else None
    )
    tokenizer = make_tokenizer(cfg.model)
    model.text.transformer.requires_grad_(False)
    if cfg.freeze_text_proj:
        model.text.proj.requires_grad_(False)
    feats = cached_text_features(model, tokenizer, pool, shard, log)
    device = torch.device(cfg.device)
    model.to(device)
    feats = feats.to(device)
    data = TrainingBatches(
        shard, pool, WORLD_MEAN, WORLD_STD, transpose=cfg.world != "v1", device=device
    )
    size = cfg.model["vision_cfg"]["image_size"]
    eval_single = make_eval_set(
        cfg.data_seed + 1,
        cfg.n_eval,
        (1, 1),
        size,
        WORLD_MEAN,
        WORLD_STD,
        family=None if cfg.world == "v1" else "heldout",
        size_range=None if cfg.world == "v1" else HELDOUT_SINGLE_SIZES,
    )
    bank_idx = torch.tensor(pool.bank_text, device=device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    pos_choices = pool.pos_text
    neg_text = np.asarray(pool.neg_text)

    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_visual = sum(p.numel() for p in model.visual.parameters())
    log(
        f"trainable params {n_trainable:,} (visual {n_visual:,}); setup {time.time() - t_start:.0f}s"
    )
    opt = torch.optim.AdamW(
        _param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6
    )
    n_classes = len(class_names())
    loss_curve: list[dict[str, float]] = []
    evals: list[dict[str, Any]] = []
    window: list[float] = []
    t_train = time.time()
    setup_seconds = t_train - t_start
    step = 0
    progress = 0.0
    ckpt_path = Path(cfg.checkpoint or Path(cfg.cache_dir) / "resume.pt")
    resumed = load_checkpoint(ckpt_path, model, opt, rng)
    if resumed is not None:
        step, loss_curve, evals = resumed.step, resumed.loss_curve, resumed.evals
        t_train -= resumed.train_seconds  # progress and wall time count the earlier runs too
        log(f"resumed from {ckpt_path} at step {step}")

    def record(final: bool = False) -> dict[str, Any]:
        return {
            "steps": step,
            "planned_steps": cfg.steps,
            "wall_seconds": round(time.time() - t_train, 1),
            "setup_seconds": round(setup_seconds, 1),
            "seconds_per_step": round((time.time() - t_train) / max(step, 1), 3),
            "data_seed": cfg.data_seed,
            "seed": cfg.seed,
            "batch_size": cfg.batch_size,
            "lr": cfg.lr,
            "n_scenes": cfg.n_scenes,
            "n_captions": len(pool.texts),
            "trainable_params": n_trainable,
            "visual_params": n_visual,
            "loss_curve": loss_curve,
            "evals": evals,
            "final": final,
            "command": command,
            "init_from": cfg.init_from,
            "grow": cfg.grow,
            "curriculum_start": cfg.curriculum_start,
            "previous_phase": previous_phase,
            "world": cfg.world,
            "same_colour_share": cfg.same_colour_share,
            "shape_negative_share": cfg.shape_negative_share,
            "single_size_range": list(cfg.single_size_range),
            "multi_size_range": list(cfg.multi_size_range),
            "freeze_text_proj": cfg.freeze_text_proj,
            "dense_weight": cfg.dense_weight,
            "background_weight": cfg.background_weight,
            "device": device_name,
        }

    while step < cfg.steps:
        elapsed = time.time() - t_train
        progress = step / cfg.steps
        if cfg.minutes:
            progress = max(progress, elapsed / (cfg.minutes * 60.0))
        if progress >= 1.0:
            break
        model.train()
        model.text.transformer.eval()
        idx = data.sample_indices(
            rng,
            cfg.batch_size,
            curriculum_weights(cfg.curriculum_start + (1 - cfg.curriculum_start) * progress),
        )
        entries = data.entry_host[idx]
        entry = torch.from_numpy(entries).to(device)
        pos_idx = [pos_choices[e][int(rng.integers(len(pos_choices[e])))] for e in entries.tolist()]
        neg_idx = [n for n in neg_text[entries].tolist() if n >= 0]
        patch = cfg.model["vision_cfg"]["patch_size"] if cfg.dense_weight > 0 else None
        images, patch_target = data.views_for(idx, rng, patch)
        loss, parts = training_loss(
            model,
            images,
            feats[torch.tensor(pos_idx, device=device)],
            feats[torch.tensor(neg_idx, dtype=torch.long, device=device)] if neg_idx else feats[:0],
            feats[bank_idx],
            entry,
            data.class_targets(idx, n_classes),
            patch_target,
            cfg.dense_weight,
            cfg.background_weight,
        )
        lr = lr_at(progress, step, cfg)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        step += 1
        window.append(float(loss.detach()))
        if step % cfg.log_every == 0:
            loss_curve.append(
                {
                    "step": step,
                    "loss": round(float(np.mean(window)), 4),
                    "t": round(time.time() - t_train, 1),
                }
            )
            log(
                f"step {step} loss {np.mean(window):.4f} clip {parts['clip']:.3f} bank {parts['bank']:.3f} "
                f"dense {parts.get('dense', 0.0):.3f} background {parts.get('background', 0.0):.3f} "
                f"scale {parts['scale']:.1f} lr {lr:.2e} progress {progress:.3f} "
                f"{(time.time() - t_train) / step:.2f}s/step"
            )
            window = []
        if step % cfg.eval_every == 0:
            acc = zero_shot(
                model, F.normalize(model.text.proj(feats[bank_idx]).float(), dim=-1), eval_single
            )
            evals.append({"step": step, "single_object_top1": acc["top1_dominant"]})
            log(f"eval step {step}: single-object zero-shot top1 {acc['top1_dominant']:.3f}")
        if step % cfg.checkpoint_every == 0:
            resumed = Resumed(step, loss_curve, evals, time.time() - t_train)
            save_checkpoint(ckpt_path, model, opt, rng, resumed)
            if out_dir is not None:
                save_reference(model, out_dir, cfg.model, record(), WORLD_MEAN, WORLD_STD, name)

    training = record(final=True)
    if cfg.final_eval:
        metrics = final_metrics if cfg.world == "v1" else final_metrics_v2
        training.update(metrics(model, tokenizer, cfg, size, log, n=cfg.n_final))
    if out_dir is not None:
        save_reference(model, out_dir, cfg.model, training, WORLD_MEAN, WORLD_STD, name)
    quiet = ("loss_curve", "evals", "previous_phase")
    log(json.dumps({k: v for k, v in training.items() if k not in quiet}))
    return training


def command_line() -> str:
    """The command that started this process, for the record."""
    args = [shlex.quote(a) for a in sys.argv[1:]]
    if sys.argv and sys.argv[0].endswith(("world/cli.py", "regionsearch")):
        # ``python -m regionsearch.eval.world.cli`` and the root CLI run the same sub-app.
        return (
            " ".join(["regionsearch", "world", *args])
            if "world" not in args[:1]
            else " ".join(["regionsearch", *args])
        )
    return " ".join([shlex.quote(sys.argv[0]), *args])
