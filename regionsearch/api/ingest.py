"""Index one uploaded image: mask proposals → region embedder → ``RegionIndex``.

Kept apart so it can be swapped for the indexer package's API (``regionsearch.indexer``) once
that exists: :func:`index_file` is the only function the upload route calls.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from regionsearch.store import NewRegion, RegionIndex


def index_file(
    index: RegionIndex, backbone: Any, path: Path, *, stored_path: str, max_regions: int = 50
) -> int:
    """Propose regions of ``path``, embed them, store them; returns the image id."""
    from regionsearch.embedders import get_embedder
    from regionsearch.masks import AutomaticProposals

    data = path.read_bytes()
    with Image.open(path) as handle:
        rgb = np.asarray(ImageOps.exif_transpose(handle).convert("RGB"))
    proposals = AutomaticProposals(max_regions=max_regions).masks_for(path, rgb)
    embedder = get_embedder(index.embedder, backbone)
    masks = np.stack([p.mask for p in proposals]) if proposals else np.zeros((0, *rgb.shape[:2]))
    vectors = (
        embedder.embed(rgb, masks).numpy().astype(np.float32)
        if len(proposals)
        else np.empty((0, index.dimension), np.float32)
    )
    regions = []
    for p in proposals:
        rle = p.to_rle()
        from regionsearch.masks import rle as rle_mod

        regions.append(
            NewRegion(
                rle=rle,
                bbox=tuple(float(v) for v in rle_mod.bbox(rle)),
                area=float(p.area),
                source=p.source,
                source_score=p.score,
                category=p.category,
            )
        )
    record = index.upsert_image(
        stored_path,
        content_hash=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data),
        mtime=path.stat().st_mtime,
        width=int(rgb.shape[1]),
        height=int(rgb.shape[0]),
    )
    index.add_image_regions(record.id, regions, vectors)
    index.checkpoint()
    return record.id
