"""The per-image work of an indexing run: file → regions (:func:`prepare_image`) → vectors
(:func:`embed_prepared`).

One implementation for every place that does it: the local pipeline (prepare in a worker pool,
embed in the main thread), the Ray actors of :mod:`regionsearch.indexer.distributed` (both in
one actor, :func:`process_image`), the API's upload ingest and the eval's search task. None of
these functions raises for a bad image: a failure is a :class:`Failed` value with its reason,
so that the single writer records it and the run goes on.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from regionsearch import DEFAULT_MAX_PIXELS
from regionsearch.image_io import ImageDecodeError, decode_image
from regionsearch.store import NewRegion

if TYPE_CHECKING:
    from regionsearch.embedders import RegionEmbedder
    from regionsearch.masks import MaskSource


@dataclass
class Prepared:
    """What a worker hands to the embedder for one image."""

    rel: str
    pixels: np.ndarray  # (H, W, 3) uint8, as embedded (after an optional downscale)
    masks: np.ndarray | None  # (M, H, W) bool; None when it came from a process (use rles)
    regions: list[NewRegion]
    meta: dict[str, Any]  # content_hash, size_bytes, mtime, width, height
    dropped_empty: int
    seconds: float


@dataclass
class Failed:
    """One image that cannot be indexed, and why (recorded as failed; the run goes on)."""

    rel: str
    reason: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Embedded:
    """An image ready for the writer: its regions (pixels and masks freed) and their vectors."""

    prepared: Prepared
    vectors: np.ndarray  # (M, d) float32, row i is prepared.regions[i]
    seconds: float  # embedding time


@dataclass(frozen=True)
class ImageJob:
    """The settings every worker turns a file into regions with (picklable: sent to workers)."""

    mask_source: MaskSource
    max_side: int | None
    max_pixels: int | None
    dimension: int  # the index's: an embedder returning another width fails the image


def prepare_image(
    path: Path,
    rel: str,
    mask_source: MaskSource,
    max_side: int | None,
    keep_masks: bool,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> Prepared | Failed:
    """Decode one file and list its regions (runs in a worker; never raises)."""
    start = time.perf_counter()
    try:
        decoded = decode_image(path, name=rel, max_side=max_side, max_pixels=max_pixels)
    except ImageDecodeError as exc:
        return Failed(rel, f"decode: {exc}")
    meta = {
        "content_hash": decoded.content_hash,
        "size_bytes": decoded.size_bytes,
        "mtime": decoded.mtime,
        "width": decoded.width,
        "height": decoded.height,
    }
    try:
        from regionsearch.masks import rle as rle_mod

        pixels = decoded.pixels  # already at most max_side
        proposals = mask_source.masks_for(path, pixels)
        kept = [p for p in proposals if p.mask.shape == pixels.shape[:2] and p.mask.any()]
        dropped = len(proposals) - len(kept)
        if not kept:
            why = f" ({dropped} empty or mis-sized)" if dropped else ""
            return Failed(rel, f"masks: the mask source gave no regions{why}", meta)
        masks = np.stack([p.mask for p in kept])
        rles = rle_mod.encode_many(masks)
        regions = [
            NewRegion(
                rle=r,
                bbox=tuple(float(v) for v in rle_mod.bbox(r)),  # type: ignore[arg-type]
                area=float(p.mask.sum()),
                source=p.source,
                source_score=p.score,
                category=p.category,
                external_id=None if p.annotation_id is None else str(p.annotation_id),
            )
            for p, r in zip(kept, rles, strict=True)
        ]
    except Exception as exc:
        return Failed(rel, f"masks: {type(exc).__name__}: {exc}", meta)
    return Prepared(
        rel=rel,
        pixels=pixels,
        masks=masks if keep_masks else None,
        regions=regions,
        meta=meta,
        dropped_empty=dropped,
        seconds=time.perf_counter() - start,
    )


def embed_prepared(
    embedder: RegionEmbedder, prepared: Prepared, dimension: int
) -> Embedded | Failed:
    """Embed the regions of one prepared image (never raises, but for Ctrl-C).

    The pixels and masks are freed once embedded: only regions and vectors travel on to the
    writer (across processes or machines in the Ray path).
    """
    start = time.perf_counter()
    try:
        masks = prepared.masks
        if masks is None:
            from regionsearch.masks import rle as rle_mod

            masks = rle_mod.decode_many([r.rle for r in prepared.regions])
        vectors = embedder.embed(prepared.pixels, masks)
        out = np.ascontiguousarray(vectors.numpy(), dtype=np.float32)
        if out.shape != (len(prepared.regions), dimension):
            raise ValueError(
                f"embedder returned shape {out.shape}, expected "
                f"({len(prepared.regions)}, {dimension})"
            )
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        return Failed(prepared.rel, f"embed: {type(exc).__name__}: {exc}", prepared.meta)
    seconds = time.perf_counter() - start
    prepared.pixels = np.empty((0, 0, 3), np.uint8)  # not needed any more: free it
    prepared.masks = None
    return Embedded(prepared, out, seconds)


def process_image(
    path: Path, rel: str, job: ImageJob, embedder: RegionEmbedder
) -> Embedded | Failed:
    """The whole per-image work in one worker (a Ray actor): decode, masks, embed."""
    prepared = prepare_image(path, rel, job.mask_source, job.max_side, True, job.max_pixels)
    if isinstance(prepared, Failed):
        return prepared
    return embed_prepared(embedder, prepared, job.dimension)
