"""``/api/regions/{id}`` and its overlay picture."""

from __future__ import annotations

import io

from fastapi import APIRouter, HTTPException, Response, status

from regionsearch.api.convert import region_out
from regionsearch.api.deps import IndexDep, RegionDep
from regionsearch.api.schemas import RegionOut
from regionsearch.search import resolve_image_path

router = APIRouter(prefix="/api/regions", tags=["regions"])

PNG = {200: {"content": {"image/png": {}}, "description": "PNG image"}}


@router.get("/{region_id}", response_model=RegionOut)
def get_region(region: RegionDep) -> RegionOut:
    """One region: box, area, source and its full-image RLE mask."""
    return region_out(region)


@router.get("/{region_id}/overlay.png", response_class=Response, responses=PNG)
def region_overlay(region: RegionDep, index: IndexDep, max_side: int = 640) -> Response:
    """The region's image with the region outlined (served by id, never by path)."""
    from regionsearch.indexer.decode import ImageDecodeError
    from regionsearch.search.render import overlay_png

    max_side = min(max(max_side, 32), 2048)
    try:
        picture = overlay_png(resolve_image_path(index, region.image_path), [region.rle], max_side)
    except ImageDecodeError as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "image file unavailable") from exc
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    return Response(buf.getvalue(), media_type="image/png", headers={"Cache-Control": "max-age=60"})
