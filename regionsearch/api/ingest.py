"""Index one uploaded image with the indexer's own steps, so an upload is stored exactly as
``regionsearch index`` would store the same file (decoding, EXIF, alpha, masks, RLE, boxes),
with the embedder options the index was built with (recorded in its manifest).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from regionsearch.errors import RegionSearchError

if TYPE_CHECKING:
    from regionsearch.embedders import RegionEmbedder
    from regionsearch.indexer.pipeline import Prepared
    from regionsearch.masks import MaskSource
    from regionsearch.store import RegionIndex


class IngestError(RegionSearchError):
    """The uploaded file could not be decoded or gave no regions."""


@dataclass
class EmbeddedFile:
    """An image's regions and their vectors, ready to store; ``described`` is the embedder's."""

    prepared: Prepared
    vectors: np.ndarray
    described: dict[str, Any]


def embed_file(
    embedder: RegionEmbedder, path: Path, *, name: str, mask_source: MaskSource | None = None
) -> EmbeddedFile:
    """Decode ``path``, propose its regions and embed them (no index needed, no lock held).

    ``name`` is how messages call the file (clients never see server paths); ``mask_source``
    defaults to the automatic proposals with their default settings.
    """
    from regionsearch.indexer.pipeline import Failed, prepare_image
    from regionsearch.masks import AutomaticProposals

    source = mask_source if mask_source is not None else AutomaticProposals()
    prepared = prepare_image(path, name, source, max_side=None, keep_masks=True)
    if isinstance(prepared, Failed):
        raise IngestError(prepared.reason)
    assert prepared.masks is not None
    vectors = np.asarray(embedder.embed(prepared.pixels, prepared.masks), np.float32)
    return EmbeddedFile(prepared, vectors, embedder.describe())


def store_embedded(index: RegionIndex, embedded: EmbeddedFile, *, stored_path: str) -> int:
    """Store an embedded file under ``stored_path`` in a writable ``index``; the image id.

    The embedder must make this index's vectors: its description is checked against the
    manifest (and recorded there when the index has none yet).
    """
    from regionsearch.store.manifest import check_embedder_description

    check_embedder_description(index.manifest, embedded.described)
    if index.manifest.embedder_description is None:
        index.record_embedder_description(embedded.described)
    record = index.upsert_image(stored_path, **embedded.prepared.meta)
    index.add_image_regions(record.id, embedded.prepared.regions, embedded.vectors)
    index.checkpoint()
    return record.id


def index_file(
    index: RegionIndex,
    embedder: RegionEmbedder,
    path: Path,
    *,
    stored_path: str,
    name: str | None = None,
    mask_source: MaskSource | None = None,
) -> int:
    """:func:`embed_file` then :func:`store_embedded`, in one call; returns the image id."""
    embedded = embed_file(embedder, path, name=name or stored_path, mask_source=mask_source)
    return store_embedded(index, embedded, stored_path=stored_path)
