"""Region embedders behind one interface, looked up by name.

>>> from regionsearch import Backbone, get_embedder
>>> backbone = Backbone.load("reference")
>>> embedder = get_embedder("maskinversion", backbone)
>>> vectors = embedder.embed(image, masks)  # (M, d), L2-normalised
"""

from __future__ import annotations

import inspect
from importlib import import_module
from typing import Any

from regionsearch.backbone import Backbone
from regionsearch.embedders.base import RegionEmbedder

#: name -> "module:Class"; imported lazily so that listing names costs nothing.
_REGISTRY: dict[str, str] = {
    "maskinversion": "regionsearch.embedders.maskinversion:MaskInversion",
    "alphaclip": "regionsearch.embedders.alphaclip:AlphaCLIP",
    "ipclip": "regionsearch.embedders.ipclip:IPCLIP",
    "global": "regionsearch.embedders.prompts:GlobalEmbedder",
    "crop": "regionsearch.embedders.prompts:CropEmbedder",
    "masked-crop": "regionsearch.embedders.prompts:MaskedCropEmbedder",
    "red-circle": "regionsearch.embedders.prompts:RedCircleEmbedder",
    "blur": "regionsearch.embedders.prompts:BlurEmbedder",
}


def list_embedders() -> list[str]:
    """Names accepted by :func:`get_embedder` and ``--embedder``."""
    return list(_REGISTRY)


def embedder_class(name: str) -> type[RegionEmbedder]:
    """The class registered under ``name``."""
    try:
        target = _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown embedder {name!r}; choose one of: {', '.join(_REGISTRY)}"
        ) from None
    module, _, cls = target.partition(":")
    return getattr(import_module(module), cls)


def option_names(name: str) -> list[str]:
    """The keyword options embedder ``name``'s constructor takes (``-E KEY=VALUE`` keys)."""
    parameters = inspect.signature(embedder_class(name).__init__).parameters
    return [p for p in parameters if p not in ("self", "backbone")]


def constructor_options(name: str, described: dict[str, Any]) -> dict[str, Any]:
    """The settings of a recorded ``describe()`` that embedder ``name``'s constructor takes back
    (how an index's own options are rebuilt for a later run or an upload)."""
    accepted = set(option_names(name))
    return {k: v for k, v in described.items() if k in accepted}


def get_embedder(name: str, backbone: Backbone, **options: Any) -> RegionEmbedder:
    """Build the embedder ``name`` on ``backbone`` with keyword ``options``.

    Options not given fall back to the model's own measured settings for this embedder
    (:meth:`Backbone.embedder_defaults`), then to the class defaults.
    """
    defaults = backbone.embedder_defaults(name)
    unknown = set(defaults) - set(option_names(name))
    if unknown:
        raise ValueError(
            f"model {backbone.name!r}: its embedder_defaults for {name!r} name settings "
            f"{name} does not take: {', '.join(sorted(unknown))}"
        )
    return embedder_class(name)(backbone, **{**defaults, **options})


__all__ = [
    "RegionEmbedder",
    "embedder_class",
    "get_embedder",
    "list_embedders",
    "option_names",
]
