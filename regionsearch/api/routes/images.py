"""``/api/images``: metadata with regions, thumbnails, overlays, uploads."""

from __future__ import annotations

import io
import re
import uuid
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Header, HTTPException, Query, Request, Response, status
from PIL import Image

from regionsearch.api.convert import public_path, public_text, region_out
from regionsearch.api.deps import (
    ApiKeyDep,
    ImageDep,
    IndexDep,
    PicturesDep,
    SameOriginDep,
    StateDep,
)
from regionsearch.api.picture_cache import file_key, picture_response
from regionsearch.api.schemas import ImageOut
from regionsearch.api.upload_body import multipart_body, read_upload
from regionsearch.image_io import ImageDecodeError
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
        path=public_path(index, record.path),
        width=record.width,
        height=record.height,
        status=record.status,
        thumbnail_url=f"/api/images/{record.id}/thumbnail.jpg",
        overlay_url=f"/api/images/{record.id}/overlay.jpg",
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
    image: ImageDep,
    index: IndexDep,
    pictures: PicturesDep,
    size: Annotated[int, Query(ge=16, le=1024)] = 256,
    if_none_match: Annotated[str | None, Header(include_in_schema=False)] = None,
) -> Response:
    """The photo as a JPEG no larger than ``size`` on its longer side: what the web page draws
    each result on (it dims the rest of the photo itself, from the region's RLE)."""
    from regionsearch.search.render import encode_picture

    path = resolve_image_path(index, image.path)
    try:
        key = ("thumbnail", file_key(path), size)
    except OSError as exc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "image file unavailable") from exc
    render = lambda: encode_picture(_pixels(index, image, size))  # noqa: E731
    return picture_response(if_none_match, pictures, key, render, "image/jpeg")


Highlight = Annotated[
    list[int] | None, Query(description="region ids drawn in red (others in blue)")
]
OverlaySide = Annotated[int, Query(ge=32, le=2048)]


@router.get(
    "/{image_id}/overlay.jpg",
    response_class=Response,
    responses={200: {"content": {"image/jpeg": {}}}},
    name="image_overlay_jpeg",
)
@router.get(
    "/{image_id}/overlay.png",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}},
    description="The same picture as ``overlay.jpg``, lossless (about 50 times the encoding cost).",
)
def image_overlay(
    request: Request,
    image: ImageDep,
    index: IndexDep,
    highlight: Highlight = None,
    only_highlight: bool = False,
    max_side: OverlaySide = 800,
) -> Response:
    """The image with all its regions outlined; ``highlight`` regions stand out (JPEG)."""
    from regionsearch.search.render import encode_picture

    fmt = "png" if request.url.path.endswith(".png") else "jpeg"
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
    return Response(encode_picture(np.ascontiguousarray(out), fmt), media_type=f"image/{fmt}")


def probe_image(data: bytes, max_pixels: int, *, verify: bool = True) -> str:
    """The format of ``data``, after checking its size in pixels and (with ``verify``) its
    structure (413/415). Callers that decode ``data`` at once pass ``verify=False``: the
    decode reads it all anyway."""
    try:
        with Image.open(io.BytesIO(data)) as probe:
            kind = probe.format
            width, height = probe.size
            if width * height > max_pixels:
                raise HTTPException(
                    status.HTTP_413_CONTENT_TOO_LARGE,
                    f"image too large: {width}x{height} pixels ({width * height / 1e6:.0f} "
                    f"megapixels); the limit is {max_pixels / 1e6:g} megapixels",
                )
            if verify:
                probe.verify()
    except HTTPException:
        raise
    except Image.DecompressionBombError as exc:  # over twice Pillow's limit: opened no further
        counted = re.search(r"\((\d+) pixels\)", str(exc))
        size = (
            f"{int(counted.group(1)) / 1e6:.0f} megapixels"
            if counted
            else f"over {2 * (Image.MAX_IMAGE_PIXELS or 0) / 1e6:.0f} megapixels"
        )
        raise HTTPException(
            status.HTTP_413_CONTENT_TOO_LARGE,
            f"image too large: {size}; the limit is {max_pixels / 1e6:g} megapixels",
        ) from None
    except Exception as exc:  # Pillow raises many types for bad input
        raise HTTPException(
            status.HTTP_415_UNSUPPORTED_MEDIA_TYPE, "not an image Pillow can read"
        ) from exc
    if kind not in ALLOWED_FORMATS:
        raise HTTPException(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE, f"unsupported format {kind}")
    return kind


UPLOAD_BODY = multipart_body(
    {"file": {"type": "string", "format": "binary", "description": "the photo"}}
)


@router.post(
    "",
    response_model=ImageOut,
    status_code=status.HTTP_201_CREATED,
    openapi_extra=UPLOAD_BODY,
    responses={
        403: {"description": "cross-origin request, or a read-only server"},
        413: {"description": "file or image over the server's limits"},
        503: {"description": "the index is being written by another process"},
    },
)
async def upload_image(
    request: Request, state: StateDep, _origin: SameOriginDep, _key: ApiKeyDep
) -> ImageOut:
    """Upload a photo (multipart field ``file``): checked by content, stored under a generated
    name, indexed at once with the index's own embedder options.

    The origin and the key are checked before any of the body is read; the body is read only
    up to the size limit.
    """
    settings = state.settings
    if not state.uploads_enabled:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "this server is read-only")
    data = await read_upload(request, settings.max_upload_bytes)  # Content-Length checked first
    kind = probe_image(data, settings.max_image_pixels)
    from starlette.concurrency import run_in_threadpool

    from regionsearch.api.ingest import embed_file, store_embedded
    from regionsearch.store import IndexLockedError
    from regionsearch.store.manifest import EmbedderMismatchError

    index = state.index
    upload_dir = index.directory / settings.upload_dir_name
    name = f"{uuid.uuid4().hex}{ALLOWED_FORMATS[kind]}"
    target = upload_dir / name
    shown = f"{settings.upload_dir_name}/{name}"

    def work() -> int:
        upload_dir.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        manifest = state.latest_manifest()  # the options to embed with
        with state.embed_lock:  # embedding needs no index lock: `index` may run meanwhile
            embedded = embed_file(state.embedder_for(manifest), target, name=shown)
        stored = str(target.resolve())
        return state.write(lambda writer: store_embedded(writer, embedded, stored_path=stored))

    try:
        image_id = await run_in_threadpool(work)
    except IndexLockedError as exc:
        target.unlink(missing_ok=True)
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            "the index is being written by another process (e.g. `regionsearch index`); "
            "upload again when it has finished",
            headers={"Retry-After": "30"},
        ) from exc
    except EmbedderMismatchError as exc:
        target.unlink(missing_ok=True)
        raise HTTPException(
            status.HTTP_409_CONFLICT, f"uploads cannot match this index's vectors: {exc}"
        ) from exc
    except Exception as exc:
        target.unlink(missing_ok=True)
        message = public_text(index, str(exc)).replace(str(target), shown)
        raise HTTPException(422, f"could not index the image: {message}") from exc
    record = index.get_image_by_id(image_id)
    assert record is not None
    return image_out(index, record)
