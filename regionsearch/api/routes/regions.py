"""``/api/regions/{id}`` and its overlay picture."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Query, Response, status

from regionsearch.api.convert import region_out
from regionsearch.api.deps import IndexDep, PicturesDep, RegionDep
from regionsearch.api.picture_cache import file_key, picture_response
from regionsearch.api.schemas import RegionOut
from regionsearch.search import resolve_image_path

router = APIRouter(prefix="/api/regions", tags=["regions"])

MaxSide = Annotated[int, Query(ge=32, le=2048, description="longest side of the picture")]


@router.get("/{region_id}", response_model=RegionOut)
def get_region(region: RegionDep) -> RegionOut:
    """One region: box, area, source and its full-image RLE mask."""
    return region_out(region)


def _overlay(
    region: RegionDep,
    index: IndexDep,
    pictures: PicturesDep,
    max_side: int,
    fmt: str,
    if_none_match: str | None,
) -> Response:
    """The region's photo with the region spotlit (the rest dimmed), served by id only.

    The decoded photo is cached apart from the overlay, so the overlays of several regions of
    one photo (one page of results) decode it once."""
    from regionsearch.image_io import ImageDecodeError
    from regionsearch.search.render import encode_picture, load_rgb, spotlight

    path = resolve_image_path(index, region.image_path)
    try:
        photo = (file_key(path), max_side)
    except OSError as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "image file unavailable") from exc

    def render() -> bytes:
        pixels = pictures.get(("photo", photo), lambda: load_rgb(path, max_side))
        return encode_picture(spotlight(pixels, region.rle), fmt)

    key = ("overlay", photo, region.id, region.rle["counts"], fmt)
    try:
        return picture_response(if_none_match, pictures, key, render, f"image/{fmt}")
    except ImageDecodeError as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "image file unavailable") from exc


IfNoneMatch = Annotated[str | None, Header(include_in_schema=False)]


@router.get(
    "/{region_id}/overlay.jpg",
    response_class=Response,
    responses={200: {"content": {"image/jpeg": {}}, "description": "JPEG image"}},
)
def region_overlay_jpeg(
    region: RegionDep,
    index: IndexDep,
    pictures: PicturesDep,
    max_side: MaxSide = 640,
    if_none_match: IfNoneMatch = None,
) -> Response:
    """The region's photo with the region spotlit (the rest dimmed), for clients that do not
    draw it themselves from the region's RLE (the web page does)."""
    return _overlay(region, index, pictures, max_side, "jpeg", if_none_match)


@router.get(
    "/{region_id}/overlay.png",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}, "description": "PNG image"}},
)
def region_overlay(
    region: RegionDep,
    index: IndexDep,
    pictures: PicturesDep,
    max_side: MaxSide = 640,
    if_none_match: IfNoneMatch = None,
) -> Response:
    """The same picture as ``overlay.jpg``, lossless (about 50 times the encoding cost)."""
    return _overlay(region, index, pictures, max_side, "png", if_none_match)
