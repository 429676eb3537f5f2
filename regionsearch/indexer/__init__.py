"""The indexing pipeline: scan a photo folder, decode, propose masks, embed, store.

- :mod:`regionsearch.indexer.scan`: walk a folder and plan what changed since the last run;
- :mod:`regionsearch.indexer.pipeline`: :class:`Indexer`, the resumable producer/consumer run;
- the ``index`` and ``stats`` commands live in :mod:`regionsearch.cli.index`.

Names are imported on first use, so ``regionsearch --help`` does not pay for FAISS or SQL.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "IMAGE_EXTENSIONS": "regionsearch.indexer.scan",
    "ScanPlan": "regionsearch.indexer.scan",
    "build_plan": "regionsearch.indexer.scan",
    "walk_images": "regionsearch.indexer.scan",
    "scan_folder": "regionsearch.indexer.scan",
    "SkippedFile": "regionsearch.indexer.scan",
    "DecodedImage": "regionsearch.image_io",
    "ImageDecodeError": "regionsearch.image_io",
    "ImageTooLargeError": "regionsearch.image_io",
    "decode_image": "regionsearch.image_io",
    "IndexReport": "regionsearch.indexer.report",
    "Indexer": "regionsearch.indexer.pipeline",
    "index_folder": "regionsearch.indexer.pipeline",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(module), name)
