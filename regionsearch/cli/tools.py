"""``regionsearch explain`` and ``regionsearch models``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from regionsearch import DEFAULT_MODEL
from regionsearch.cli.errors import CliError, MappedCommand
from regionsearch.cli.options import DeviceOption, ModelOption, PretrainedOption


def explain(
    image: Annotated[Path, typer.Argument(help="Image file.", exists=True, dir_okay=False)],
    texts: Annotated[list[str], typer.Argument(help="One or more texts to explain.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="PNG to write.")] = Path(
        "legrad.png"
    ),
    model: ModelOption = DEFAULT_MODEL,
    pretrained: PretrainedOption = None,
    layers: Annotated[int, typer.Option(min=1, help="Sum the maps of the last K blocks.")] = 2,
    resolution: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Square input size, a multiple of the patch size (default: the model's region "
            "size).",
        ),
    ] = None,
    template: Annotated[str, typer.Option(help="Prompt template, '{}' is the text.")] = "{}",
    device: DeviceOption = None,
) -> None:
    """Write LeGrad explainability maps of TEXTS over IMAGE, one panel per text."""
    from regionsearch.backbone import load_backbone
    from regionsearch.embedders.base import check_resolution
    from regionsearch.embedders.legrad import LeGrad
    from regionsearch.image_io import read_rgb
    from regionsearch.visualize import heatmap_overlay, labelled_panel

    if "{}" not in template:
        raise CliError(f"--template {template!r} has no '{{}}' where the text goes")
    if not all(text.strip() for text in texts):
        raise CliError("a text to explain is empty")
    rgb = read_rgb(image)  # (H, W, 3) uint8, decoded exactly as the indexer does
    backbone = load_backbone(model, pretrained, device)
    try:  # bounds that depend on the model: its depth and patch size
        size = check_resolution(backbone, resolution or backbone.region_resolution)
        legrad = LeGrad(backbone.vit, layers=layers)
    except ValueError as exc:
        raise CliError(f"{exc} (model {backbone.name})") from None
    height, width = rgb.shape[:2]
    pixels = backbone.preprocess(rgb, size)[None]
    queries = backbone.encode_text(texts, templates=[template])
    maps = legrad.maps(pixels, queries, size=(height, width))
    tiles = [heatmap_overlay(rgb, m.cpu().numpy()) for m in maps[0]]
    labelled_panel(tiles, texts, tile_size=min(512, width), columns=len(texts)).save(output)
    typer.echo(f"wrote {output} ({len(texts)} map(s), model {backbone.name})")


def models() -> None:
    """List bundled models and region embedders."""
    from regionsearch.backbone import list_bundled_models
    from regionsearch.backbone.loading import bundled_embedder_defaults
    from regionsearch.embedders import list_embedders

    names = list_bundled_models()
    bundled = [f"{m} (default)" if m == DEFAULT_MODEL else m for m in names]
    typer.echo("bundled models: " + (", ".join(bundled) or "none"))
    typer.echo("embedders:      " + ", ".join(list_embedders()))
    for model in names:
        for embedder, settings in bundled_embedder_defaults(model).items():
            shown = ", ".join(f"{k}={v}" for k, v in settings.items())
            typer.echo(
                f"{model} runs {embedder} with {shown} (measured for this model; "
                "-E KEY=VALUE overrides)"
            )
    typer.echo("any open_clip ViT also works, e.g. --model ViT-B-16/openai (needs its weights)")


def register(app: typer.Typer) -> None:
    """Add ``explain`` and ``models`` to ``app``."""
    app.command("explain", cls=MappedCommand)(explain)
    app.command("models", cls=MappedCommand)(models)
