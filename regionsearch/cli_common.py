"""Compatibility aliases for modules not yet moved into :mod:`regionsearch.cli`.

``regionsearch.eval.cli`` still imports its options and the model loader from here; new code
uses :mod:`regionsearch.cli.options` and :func:`regionsearch.backbone.load_backbone`. Remove
this module once nothing imports it.
"""

from __future__ import annotations

from typing import Any

from regionsearch.cli.options import DeviceOption, ModelOption, PretrainedOption

__all__ = ["DeviceOption", "ModelOption", "PretrainedOption", "load_backbone_for_cli"]


def load_backbone_for_cli(
    model: str, pretrained: str | None, device: str | None, allow_random: bool = False
) -> Any:
    """:func:`regionsearch.backbone.load_backbone` under its old name."""
    from regionsearch.backbone import load_backbone

    return load_backbone(model, pretrained, device, allow_random=allow_random)
