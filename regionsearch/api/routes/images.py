"""``/api/images``: metadata with regions, thumbnails, overlays, uploads."""

from __future__ import annotations

import io
import uuid
from typing import Annotated

import numpy as np
from fastapi import APIRouter, HTTPException, Query, Request, Response, UploadFile, status
from PIL import Image

from regionsearch.api.convert import region_out
from regionsearch.api.deps import ApiKeyDep, ImageDep, IndexDep, StateDep
from regionsearch.api.schemas import ImageOut
from regionsearch.indexer.decode import ImageDecodeError
from regionsearch.search import resolve_image_path
from regionsearch.search.render import load_rgb, outline_regions
from regionsearch.store import ImageRecord, RegionIndex

router = APIRouter(prefix="/api/images", tags=["images"])

ALLOWED_FORMATS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp"}
HIGHLIGHT = (255, 48, 48)
OTHERS = (80, 170, 255)


def image_out(index: RegionIndex, record: ImageRecord) -> ImageOut:
    return ImageOut(
        id=record.id,
        path=record.path,
        width=record.width,
        height=record.height,
        status=record.status,
        thumbnail_url=f"/api/images/{record.id}/thumbnail.jpg",
        overlay_url=f"/api/images/{record.id}/overlay.png",
        regions=[region_out(r) for r in index.regions_of_image(record.id)],
    )


@router.get("/{image_id}", response_model=ImageOut)
def get_image(image: ImageDep, index: IndexDep) -> ImageOut:
    """An image's metadata and all its live regions."""
    return image_out(index, image)


def _pixels(index: RegionIndex, record: ImageRecord, max_side: int) -> np.ndarray:
    """The stored photo as indexed (longest side <= ``max_side``), or 404 if it is gone."""
    try:
        return load_rgb(resolve_image_path(index, record.path), max_side)
    except ImageDecodeError as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "image file unavailable") from exc


@router.get(
    "/{image_id}/thumbnail.jpg",
    response_class=Response,
    responses={200: {"content": {"image/jpeg": {}}}},
)
def thumbnail(
    image: ImageDep, index: IndexDep, size: Annotated[int, Query(ge=16, le=1024)] = 256
) -> Response:
    """A JPEG no larger than ``size`` on its longer side."""
    buf = io.BytesIO()
    Image.fromarray(_pixels(index, image, size)).save(buf, format="JPEG", quality=85)
    return Response(
        buf.getvalue(), media_type="image/jpeg", headers={"Cache-Control": "max-age=60"}
    )


@router.get(
    "/{image_id}/overlay.png",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}},
)
def image_overlay(
    image: ImageDep,
    index: IndexDep,
    highlight: Annotated[
        list[int] | None, Query(description="region ids drawn in red (others in blue)")
    ] = None,
    only_highlight: bool = False,
    max_side: Annotated[int, Query(ge=32, le=2048)] = 800,
) -> Response:
    """The image with all its regions outlined; ``highlight`` regions stand out."""
    rgb = _pixels(index, image, max_side)
    wanted = set(highlight or [])
    regions = index.regions_of_image(image.id)
    others = [r.rle for r in regions if r.id not in wanted]
    marked = [r.rle for r in regions if r.id in wanted]
    out = rgb
    if others and not only_highlight:
        out = outline_regions(out, others, colours=[OTHERS], thickness=1, fill_opacity=0.0)
    if marked:
        out = outline_regions(out, marked, colours=[HIGHLIGHT])
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(out)).save(buf, format="PNG")
    return Response(buf.getvalue(), media_type="image/png")


@router.post("", response_model=ImageOut, status_code=status.HTTP_201_CREATED)
async def upload_image(
    request: Request, state: StateDep, _key: ApiKeyDep, file: UploadFile
) -> ImageOut:
    """Upload a photo: checked by content, stored under a generated name, indexed at once."""
    settings = state.settings
    if not state.uploads_enabled:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "this server is read-only")
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > settings.max_upload_bytes + 64 * 1024:
        raise HTTPException(413, "upload too large")
    data = await file.read(settings.max_upload_bytes + 1)
    if len(data) > settings.max_upload_bytes:
        raise HTTPException(413, "upload too large")
    if not data:
        raise HTTPException(422, "empty file")
    try:
        with Image.open(io.BytesIO(data)) as probe:
            kind = probe.format
            width, height = probe.size
            if width * height > settings.max_image_pixels:
                raise HTTPException(413, "image too large")
            probe.verify()
    except HTTPException:
        raise
    except Exception as exc:  # Pillow raises many types for bad input
        raise HTTPException(
            status.HTTP_415_UNSUPPORTED_MEDIA_TYPE, "not an image Pillow can read"
        ) from exc
    if kind not in ALLOWED_FORMATS:
        raise HTTPException(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE, f"unsupported format {kind}")
    from starlette.concurrency import run_in_threadpool

    index = state.index
    upload_dir = index.directory / settings.upload_dir_name
    upload_dir.mkdir(parents=True, exist_ok=True)
    target = upload_dir / f"{uuid.uuid4().hex}{ALLOWED_FORMATS[kind]}"
    target.write_bytes(data)

    def work() -> int:
        from regionsearch.api.ingest import index_file

        with state.write_lock:
            return index_file(index, state.embedder, target, stored_path=str(target.resolve()))

    try:
        image_id = await run_in_threadpool(work)
    except Exception as exc:
        target.unlink(missing_ok=True)
        raise HTTPException(422, f"could not index the image: {exc}") from exc
    record = index.get_image_by_id(image_id)
    assert record is not None
    return image_out(index, record)
