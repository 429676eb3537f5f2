"""Store/search records → response models (one place, so every route shapes data alike).

Clients see image paths relative to the index's photo folder (uploads: ``uploads/<name>``),
never where anything lives on the server.
"""

from __future__ import annotations

from pathlib import Path

from regionsearch.api.schemas import HitOut, RegionOut, RLEOut
from regionsearch.search import RegionHit
from regionsearch.store import RegionIndex, RegionRecord


def public_path(index: RegionIndex, stored: str) -> str:
    """``stored`` as clients may see it: relative to the image root (or, for uploads, to the
    index directory); an absolute path elsewhere is reduced to its file name."""
    path = Path(stored)
    if not path.is_absolute():
        return stored
    for base in (index.manifest.image_root, index.directory):
        if base and path.is_relative_to(base):
            return path.relative_to(base).as_posix()
    return path.name


def public_text(index: RegionIndex, text: str) -> str:
    """``text`` (an error message) with the server's folders taken out."""
    for base in (index.manifest.image_root, str(index.directory)):
        if base:
            text = text.replace(base.rstrip("/") + "/", "").replace(base, "<index>")
    return text


def _rle(rle: dict) -> RLEOut:
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode()
    return RLEOut(size=list(rle["size"]), counts=counts)


def region_out(r: RegionRecord) -> RegionOut:
    return RegionOut(
        id=r.id,
        image_id=r.image_id,
        bbox=[float(v) for v in r.bbox],
        area=float(r.area),
        source=r.source,
        category=r.category,
        rle=_rle(r.rle),
        overlay_url=f"/api/regions/{r.id}/overlay.jpg",
    )


def hit_out(h: RegionHit, index: RegionIndex) -> HitOut:
    return HitOut(
        id=h.region_id,
        image_id=h.image_id,
        image_path=public_path(index, h.image_path),
        bbox=list(h.bbox),
        area=h.area,
        source=h.source,
        category=h.category,
        rle=_rle(h.rle),
        score=h.score,
        overlay_url=f"/api/regions/{h.region_id}/overlay.jpg",
        image_url=f"/api/images/{h.image_id}",
    )
