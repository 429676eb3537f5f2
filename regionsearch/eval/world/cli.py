"""``regionsearch world ...``: generate synthetic datasets and train the bundled reference models.

The root CLI mounts ``world_app``; ``python -m regionsearch.eval.world.cli`` runs it standalone.
Heavy imports (torch, open_clip) happen inside the commands so ``--help`` stays instant.
"""

from __future__ import annotations

from pathlib import Path

import typer

from regionsearch.eval.world.worlds import world_family, worlds_help

world_app = typer.Typer(
    help="Synthetic world of coloured shapes: datasets with exact masks and referring "
    "expressions, and training of the bundled reference CLIP that works offline.",
    no_args_is_help=True,
)


def _positive(value: float) -> float:
    """A learning rate must be a positive number (0 or NaN trains nothing)."""
    if not value > 0:
        raise typer.BadParameter(f"must be > 0, got {value}")
    return value


@world_app.command("generate")
def generate_cmd(
    out: str = typer.Argument(
        ..., help="Output folder (images/, instances.json, expressions.json, captions.json)."
    ),
    n: int = typer.Option(500, "--n", min=1, help="Number of scenes."),
    seed: int = typer.Option(7, "--seed", help="Random seed; the same seed gives identical files."),
    size: int = typer.Option(224, "--size", min=16, help="Canvas size in pixels (square)."),
    min_objects: int = typer.Option(1, "--min-objects", min=1, help="Fewest objects per scene."),
    max_objects: int = typer.Option(6, "--max-objects", min=1, help="Most objects per scene."),
    difficulty: str = typer.Option(
        "normal",
        "--difficulty",
        help="easy (flat backgrounds, large objects), normal or hard (clutter, small objects).",
    ),
    family: str = typer.Option(
        "",
        "--family",
        help="World v2 family: 'train' or 'heldout' (colour-ambiguous scenes, patterns, "
        "textured backgrounds, non-square canvases; --size is the short side). Empty = v1.",
    ),
) -> None:
    """Write a COCO-format dataset of world scenes with captions and referring expressions."""
    from regionsearch.eval.world.generate import DIFFICULTIES, generate_dataset
    from regionsearch.eval.world.scene_v2 import get_family

    if min_objects > max_objects:
        raise typer.BadParameter(
            f"{min_objects} is more than --max-objects {max_objects}", param_hint="--min-objects"
        )
    if difficulty not in DIFFICULTIES:
        raise typer.BadParameter(
            f"unknown difficulty {difficulty!r}; choose one of {sorted(DIFFICULTIES)}",
            param_hint="--difficulty",
        )
    if family:
        try:
            get_family(family)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--family") from None

    summary = generate_dataset(
        Path(out),
        n=n,
        seed=seed,
        size=size,
        min_objects=min_objects,
        max_objects=max_objects,
        difficulty=difficulty,
        family=family or None,
    )
    typer.echo(
        f"wrote {summary['images']} images, {summary['annotations']} objects and "
        f"{summary['expressions']} referring expressions to {out}"
    )


@world_app.command("train-reference")
def train_reference_cmd(
    out: str = typer.Option(
        "regionsearch/models", "--out", help="Folder for reference.json/.safetensors."
    ),
    steps: int = typer.Option(3000, "--steps", min=1, help="Maximum optimiser steps."),
    seed: int = typer.Option(0, "--seed", help="Seed for initialisation and batch sampling."),
    minutes: float = typer.Option(
        55.0, "--minutes", min=0.0, help="Wall-clock budget for the training loop (0 = no limit)."
    ),
    data_seed: int = typer.Option(
        1234, "--data-seed", help="Seed of the rendered training scenes."
    ),
    batch_size: int = typer.Option(64, "--batch-size", min=2),
    lr: float = typer.Option(1.5e-3, "--lr", callback=_positive, help="Peak learning rate (> 0)."),
    n_scenes: int = typer.Option(40000, "--n-scenes", min=1, help="Pre-rendered training scenes."),
    n_captions: int = typer.Option(
        4000, "--n-captions", min=1, help="Distinct multi-object class lists."
    ),
    layers: int = typer.Option(4, "--layers", min=1, help="ViT depth."),
    width: int = typer.Option(96, "--width", min=8, help="ViT width."),
    heads: int = typer.Option(4, "--heads", min=1, help="ViT attention heads."),
    image_size: int = typer.Option(64, "--image-size", min=16, help="Training input size."),
    cache_dir: str = typer.Option(
        "runs/world-train", "--cache-dir", help="Rendered shards and caption features."
    ),
    threads: int = typer.Option(2, "--threads", min=1, help="torch CPU threads."),
    init_from: str = typer.Option(
        "", "--init-from", help="Continue from this reference.safetensors (a second phase)."
    ),
    grow: bool = typer.Option(
        False,
        "--grow",
        help="When --layers exceeds --init-from's depth, insert identity blocks (their output "
        "projections zeroed) between its blocks: a deeper model computing the same function.",
    ),
    warmup_steps: int = typer.Option(60, "--warmup-steps", min=0),
    curriculum_start: float = typer.Option(
        0.0,
        "--curriculum-start",
        min=0.0,
        max=1.0,
        help="Curriculum position to start at (1 = late, multi-object mix).",
    ),
    world: str = typer.Option(
        "v1",
        "--world",
        help="Training world: " + worlds_help(),
    ),
    patch_size: int = typer.Option(8, "--patch-size", min=1, help="ViT patch size."),
    same_colour_share: float = typer.Option(
        0.0,
        "--same-colour-share",
        min=0.0,
        max=1.0,
        help="Share of multi-object captions with one shared colour.",
    ),
    shape_negative_share: float = typer.Option(
        0.5,
        "--shape-negative-share",
        min=0.0,
        max=1.0,
        help="Share of hard negatives that change a shape.",
    ),
    single_sizes: str = typer.Option(
        "0.15,0.75", "--single-sizes", help="Object size range of 1-object scenes (short side)."
    ),
    multi_sizes: str = typer.Option(
        "0.15,0.45", "--multi-sizes", help="Object size range of multi-object scenes."
    ),
    name: str = typer.Option("reference", "--name", help="Weights file stem in --out."),
    checkpoint_every: int = typer.Option(
        100, "--checkpoint-every", min=1, help="Steps between saves."
    ),
    n_final: int = typer.Option(
        500, "--n-final", min=0, help="Scenes per final zero-shot set (0 = no final evaluation)."
    ),
    device: str = typer.Option(
        "cpu",
        "--device",
        help="Train on this torch device (cuda: the model and the whole shard on the GPU).",
    ),
    render_workers: int = typer.Option(
        1,
        "--render-workers",
        min=1,
        help="Processes rendering the shard (>1: seeded per chunk, a different shard than 1).",
    ),
    text_weights: bool = typer.Option(
        True,
        "--text-weights/--no-text-weights",
        help="--no-text-weights: build MiniLM without its weights (caption features must be "
        "cached in --cache-dir and --n-final 0), for a GPU machine without the package's weights.",
    ),
    checkpoint: str = typer.Option(
        "", "--checkpoint", help="Resumable checkpoint (default {cache-dir}/resume.pt)."
    ),
    freeze_text_proj: bool = typer.Option(
        False,
        "--freeze-text-proj",
        help="Keep the text projection of --init-from fixed (text vectors do not move).",
    ),
    dense_weight: float = typer.Option(
        0.0,
        "--dense-weight",
        min=0.0,
        help="Weight of the dense loss: every patch an object covers must score its own class "
        "prompt (teaches *where*, not only *what*; renders masks with the shard). 0 = off.",
    ),
    background_weight: float = typer.Option(
        0.0,
        "--background-weight",
        min=0.0,
        help="With --dense-weight: patches no object touches are pushed to favour no class "
        "prompt (object-coloured texture is not an object). 0 = off.",
    ),
) -> None:
    """Train the reference CLIP (small ViT + frozen MiniLM text tower) on world scenes."""
    _check_world(world)
    import torch

    from regionsearch.eval.world.train_reference import (
        TextWeightsNeeded,
        TrainConfig,
        command_line,
        reference_model_cfg,
        train_reference,
    )

    torch.set_num_threads(threads)
    _check_device(device)
    if grow and not init_from:
        raise typer.BadParameter("grows the model of --init-from; give it", param_hint="--grow")
    cfg = TrainConfig(
        steps=steps,
        minutes=minutes or None,
        seed=seed,
        data_seed=data_seed,
        batch_size=batch_size,
        lr=lr,
        n_scenes=n_scenes,
        n_multi_captions=n_captions,
        model=reference_model_cfg(
            image_size=image_size,
            patch_size=patch_size,
            width=width,
            layers=layers,
            head_width=width // heads,
        ),
        cache_dir=cache_dir,
        init_from=init_from or None,
        grow=grow,
        warmup_steps=warmup_steps,
        curriculum_start=curriculum_start,
        world=world,
        same_colour_share=same_colour_share,
        shape_negative_share=shape_negative_share,
        single_size_range=_size_range(single_sizes),
        multi_size_range=_size_range(multi_sizes),
        checkpoint=checkpoint or None,
        checkpoint_every=checkpoint_every,
        n_final=n_final,
        final_eval=n_final > 0,
        device=device,
        render_workers=render_workers,
        load_text_weights=text_weights,
        freeze_text_proj=freeze_text_proj,
        dense_weight=dense_weight,
        background_weight=background_weight,
    )
    try:
        train_reference(
            cfg, Path(out), log=lambda s: typer.echo(s, nl=True), command=command_line(), name=name
        )
    except TextWeightsNeeded as exc:
        raise typer.BadParameter(str(exc), param_hint="--no-text-weights") from exc


def _check_world(world: str) -> None:
    """An unknown ``--world`` is a usage error (exit 2, one line), not a traceback."""

    try:
        world_family(world)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--world") from exc


def _check_device(device: str) -> None:
    """A CUDA ``--device`` without a visible GPU is a usage error; with one, tf32 matmuls on
    (the tiny ViT tolerates them)."""
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise typer.BadParameter("no CUDA device is visible to torch", param_hint="--device")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def _size_range(text: str) -> tuple[float, float]:
    """``"0.1,0.7"`` -> ``(0.1, 0.7)``, or a clear error."""
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"expected two comma-separated fractions, got {text!r}") from None
    if not 0 < lo <= hi <= 1:
        raise typer.BadParameter(f"size range must satisfy 0 < lo <= hi <= 1, got {text!r}")
    return lo, hi


@world_app.command("train-alphaclip")
def train_alphaclip_cmd(
    models: str = typer.Option(
        "regionsearch/models", "--models", help="Folder with reference.json/.safetensors."
    ),
    steps: int = typer.Option(600, "--steps", min=1, help="Maximum optimiser steps."),
    minutes: float = typer.Option(
        14.0, "--minutes", min=0.0, help="Wall-clock budget (0 = no limit)."
    ),
    seed: int = typer.Option(0, "--seed"),
    data_seed: int = typer.Option(4321, "--data-seed", help="Seed of the rendered region scenes."),
    batch_size: int = typer.Option(96, "--batch-size", min=2),
    n_scenes: int = typer.Option(12000, "--n-scenes", min=1),
    cache_dir: str = typer.Option("runs/world-alphaclip", "--cache-dir"),
    threads: int = typer.Option(2, "--threads", min=1),
    world: str = typer.Option(
        "v1",
        "--world",
        help="Training world (v2 worlds evaluate on the held-out family): " + worlds_help(),
    ),
    name: str = typer.Option("reference", "--name", help="Base model file stem in --models."),
    negative_frac: float = typer.Option(
        0.0,
        "--negative-frac",
        min=0.0,
        max=0.9,
        help="Share of training masks replaced by non-object regions (background, object plus "
        "background) that must score below every class prompt, so search ranks them low.",
    ),
    device: str = typer.Option(
        "cpu", "--device", help="Train on this torch device (the shard stays on the host)."
    ),
    render_workers: int = typer.Option(
        1,
        "--render-workers",
        min=1,
        help="Processes rendering the shard (>1: seeded per chunk, a different shard than 1).",
    ),
    text_features: str | None = typer.Option(
        None,
        "--text-features",
        help="Class prompt vectors (.npz of save_class_text) of this model's text side: no "
        "MiniLM weights needed (a GPU machine's case).",
    ),
) -> None:
    """Fine-tune the Alpha-CLIP variant (alpha-channel patch conv) of the reference model."""
    _check_world(world)
    import torch

    from regionsearch.eval.world.train_alphaclip import AlphaConfig, train_alphaclip
    from regionsearch.eval.world.train_reference import command_line

    torch.set_num_threads(threads)
    _check_device(device)
    if text_features is not None and not Path(text_features).is_file():
        raise typer.BadParameter(f"no such file: {text_features}", param_hint="--text-features")
    cfg = AlphaConfig(
        steps=steps,
        minutes=minutes or None,
        seed=seed,
        data_seed=data_seed,
        batch_size=batch_size,
        n_scenes=n_scenes,
        cache_dir=cache_dir,
        world=world,
        name=name,
        negative_frac=negative_frac,
        device=device,
        render_workers=render_workers,
        text_features=text_features,
    )
    train_alphaclip(cfg, Path(models), log=lambda s: typer.echo(s), command=command_line())


if __name__ == "__main__":
    world_app()
