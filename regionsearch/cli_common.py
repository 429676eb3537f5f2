"""Options and helpers shared by the command-line commands."""

from __future__ import annotations

from typing import Annotated

import typer

ModelOption = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help="Model: 'reference' (bundled, offline), an open_clip name/tag such as "
        "ViT-B-16/openai, NAME:/path/to/weights.pt, or local-dir:/path.",
    ),
]
PretrainedOption = Annotated[
    str | None,
    typer.Option(help="Pretrained tag or checkpoint file for an open_clip architecture."),
]
DeviceOption = Annotated[
    str | None, typer.Option(help="Torch device (default: cuda when available, else cpu).")
]


def load_backbone_for_cli(
    model: str, pretrained: str | None, device: str | None, allow_random: bool = False
):
    """Load a backbone, refusing random weights unless the command only measures speed."""
    from regionsearch.backbone import Backbone
    from regionsearch.errors import BackboneLoadError

    backbone = Backbone.load(model, pretrained, device)
    if backbone.random_init and not allow_random:
        raise BackboneLoadError(
            f"{model} has no weights (random init would give meaningless results): pass "
            "--pretrained TAG_OR_FILE, or use --model reference"
        )
    return backbone
