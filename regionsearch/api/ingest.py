"""Index one uploaded image with the indexer's own steps, so an upload is stored exactly as
``regionsearch index`` would store the same file (decoding, EXIF, alpha, masks, RLE, boxes).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from regionsearch.errors import RegionSearchError

if TYPE_CHECKING:
    from regionsearch.embedders import RegionEmbedder
    from regionsearch.masks import MaskSource
    from regionsearch.store import RegionIndex


class IngestError(RegionSearchError):
    """The uploaded file could not be decoded or gave no regions."""


def index_file(
    index: RegionIndex,
    embedder: RegionEmbedder,
    path: Path,
    *,
    stored_path: str,
    mask_source: MaskSource | None = None,
) -> int:
    """Propose (or load) the regions of ``path``, embed them, store them; returns the image id.

    ``embedder`` must be the index's own (the server builds it once from the manifest's name);
    ``mask_source`` defaults to the automatic proposals with their default settings.
    """
    from regionsearch.indexer.pipeline import Failed, prepare_image
    from regionsearch.masks import AutomaticProposals

    source = mask_source if mask_source is not None else AutomaticProposals()
    prepared = prepare_image(path, stored_path, source, max_side=None, keep_masks=True)
    if isinstance(prepared, Failed):
        raise IngestError(prepared.reason)
    assert prepared.masks is not None
    vectors = embedder.embed(prepared.pixels, prepared.masks)
    record = index.upsert_image(stored_path, **prepared.meta)
    index.add_image_regions(record.id, prepared.regions, np.asarray(vectors, np.float32))
    index.checkpoint()
    return record.id
