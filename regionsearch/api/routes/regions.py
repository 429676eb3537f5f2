"""``/api/regions/{id}`` and its overlay picture."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Response, status

from regionsearch.api.convert import region_out
from regionsearch.api.deps import IndexDep, RegionDep
from regionsearch.api.schemas import RegionOut
from regionsearch.search import resolve_image_path

router = APIRouter(prefix="/api/regions", tags=["regions"])

MaxSide = Annotated[int, Query(ge=32, le=2048, description="longest side of the picture")]


@router.get("/{region_id}", response_model=RegionOut)
def get_region(region: RegionDep) -> RegionOut:
    """One region: box, area, source and its full-image RLE mask."""
    return region_out(region)


def _overlay(region: RegionDep, index: IndexDep, max_side: int, fmt: str) -> Response:
    """The region's photo with the region spotlit (the rest dimmed), served by id only."""
    from regionsearch.indexer.decode import ImageDecodeError
    from regionsearch.search.render import encode_picture, region_picture

    try:
        pixels = region_picture(resolve_image_path(index, region.image_path), region.rle, max_side)
    except ImageDecodeError as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "image file unavailable") from exc
    return Response(
        encode_picture(pixels, fmt),
        media_type=f"image/{fmt}",
        headers={"Cache-Control": "max-age=60"},
    )


@router.get(
    "/{region_id}/overlay.jpg",
    response_class=Response,
    responses={200: {"content": {"image/jpeg": {}}, "description": "JPEG image"}},
)
def region_overlay_jpeg(region: RegionDep, index: IndexDep, max_side: MaxSide = 640) -> Response:
    """The region's photo with the region spotlit (the rest dimmed): what result pages show."""
    return _overlay(region, index, max_side, "jpeg")


@router.get(
    "/{region_id}/overlay.png",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}, "description": "PNG image"}},
)
def region_overlay(region: RegionDep, index: IndexDep, max_side: MaxSide = 640) -> Response:
    """The same picture as ``overlay.jpg``, lossless (about 50 times the encoding cost)."""
    return _overlay(region, index, max_side, "png")
