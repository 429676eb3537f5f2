"""The ``regionsearch`` command line: index photos, search regions, explain, evaluate."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from regionsearch.cli_common import (
    DeviceOption,
    ModelOption,
    PretrainedOption,
    load_backbone_for_cli,
)
from regionsearch.errors import RegionSearchError

app = typer.Typer(
    name="regionsearch",
    help="Find the region of a photo that matches a text. Index a folder of photos "
    "(every region gets a MaskInversion embedding), then search it with words.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.command()
def explain(
    image: Annotated[Path, typer.Argument(help="Image file.", exists=True, dir_okay=False)],
    texts: Annotated[list[str], typer.Argument(help="One or more texts to explain.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="PNG to write.")] = Path(
        "legrad.png"
    ),
    model: ModelOption = "reference",
    pretrained: PretrainedOption = None,
    layers: Annotated[int, typer.Option(help="Sum the maps of the last K blocks.")] = 2,
    resolution: Annotated[
        int | None, typer.Option(help="Square input size (default: the model's region resolution).")
    ] = None,
    template: Annotated[str, typer.Option(help="Prompt template, '{}' is the text.")] = "{}",
    device: DeviceOption = None,
) -> None:
    """Write LeGrad explainability maps of TEXTS over IMAGE, one panel per text."""
    from regionsearch.embedders.legrad import LeGrad
    from regionsearch.indexer.decode import read_rgb
    from regionsearch.visualize import heatmap_overlay, labelled_panel

    backbone = load_backbone_for_cli(model, pretrained, device)
    rgb = read_rgb(image)  # (H, W, 3) uint8, decoded exactly as the indexer does
    height, width = rgb.shape[:2]
    pixels = backbone.preprocess(rgb, resolution or backbone.region_resolution)[None]
    queries = backbone.encode_text(texts, templates=[template])
    maps = LeGrad(backbone.vit, layers=layers).maps(pixels, queries, size=(height, width))
    tiles = [heatmap_overlay(rgb, m.cpu().numpy()) for m in maps[0]]
    labelled_panel(tiles, texts, tile_size=min(512, width), columns=len(texts)).save(output)
    typer.echo(f"wrote {output} ({len(texts)} map(s), model {backbone.name})")


@app.command("models")
def list_models() -> None:
    """List bundled models and region embedders."""
    from regionsearch.backbone import list_bundled_models
    from regionsearch.embedders import list_embedders

    typer.echo("bundled models: " + (", ".join(list_bundled_models()) or "none"))
    typer.echo("embedders:      " + ", ".join(list_embedders()))
    typer.echo("any open_clip ViT also works, e.g. --model ViT-B-16/openai (needs its weights)")


# --- sub-commands registered by their own modules (one line each) -------------------------
# (each module exposes `register(app: typer.Typer) -> None`)
from regionsearch.eval.world.cli import world_app  # noqa: E402

app.add_typer(world_app, name="world")
from regionsearch.search.cli import register as register_search  # noqa: E402

register_search(app)
from regionsearch.api.cli import register as register_api  # noqa: E402

register_api(app)
from regionsearch.indexer.cli import register as register_indexer  # noqa: E402

register_indexer(app)
from regionsearch.eval.cli import eval_command  # noqa: E402

app.command("eval")(eval_command)
# --- end of sub-commands ------------------------------------------------------------------


def main() -> None:
    """Console entry point: errors users can fix are printed as one line, exit code 2."""
    try:
        app()
    except RegionSearchError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
