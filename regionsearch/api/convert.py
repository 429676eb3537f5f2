"""Store/search records → response models (one place, so every route shapes data alike)."""

from __future__ import annotations

from regionsearch.api.schemas import HitOut, RegionOut, RLEOut
from regionsearch.search import RegionHit
from regionsearch.store import RegionRecord


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
        overlay_url=f"/api/regions/{r.id}/overlay.png",
    )


def hit_out(h: RegionHit) -> HitOut:
    return HitOut(
        id=h.region_id,
        image_id=h.image_id,
        image_path=h.image_path,
        bbox=list(h.bbox),
        area=h.area,
        source=h.source,
        category=h.category,
        rle=_rle(h.rle),
        score=h.score,
        overlay_url=f"/api/regions/{h.region_id}/overlay.png",
        image_url=f"/api/images/{h.image_id}",
    )
