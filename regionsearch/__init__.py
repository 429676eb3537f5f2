"""regionsearch: find the region of a photo that matches a text.

>>> from regionsearch import Backbone, get_embedder
>>> backbone = Backbone.load("reference")
>>> vectors = get_embedder("maskinversion", backbone).embed(image, masks)  # (M, d)
>>> found = regionsearch.refer("park.jpg", "the dog on the left")  # no index needed
>>> found.best.bbox, found.best.score, found.best.mask()

Names are imported on first use, so ``regionsearch --help`` does not pay for torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"
#: The bundled model every command and ``Backbone.load()`` use unless told otherwise.
DEFAULT_MODEL = "reference-v8"
#: The region embedder a new index uses unless told otherwise (the method this project is about).
DEFAULT_EMBEDDER = "maskinversion"
#: Default bound on decoded pixels: twice Pillow's own decompression-bomb threshold (178 MP,
#: about 0.5 GB of RGB). Photos above it are refused unless ``max_side`` lets a JPEG decode at a
#: reduced scale below it; raise it with ``--max-pixels``.
DEFAULT_MAX_PIXELS = 2 * 89_478_485

_EXPORTS = {
    "Backbone": "regionsearch.backbone",
    "list_bundled_models": "regionsearch.backbone",
    "RegionEmbedder": "regionsearch.embedders",
    "get_embedder": "regionsearch.embedders",
    "list_embedders": "regionsearch.embedders",
    "MaskInversion": "regionsearch.embedders.maskinversion",
    "LeGrad": "regionsearch.embedders.legrad",
    "refer": "regionsearch.search.examples",
}

__all__ = [*_EXPORTS, "DEFAULT_MODEL", "__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'regionsearch' has no attribute {name!r}")
    return getattr(import_module(module), name)
