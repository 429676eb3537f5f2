"""The multipart body of the stateless routes (``/api/search/by-image``, ``POST /api/refer``):
one photo plus masks, read with the upload route's limits and checks, never written anywhere.

Fields (all optional but ``file``; each mask field may repeat):

* ``file`` — the photo (JPEG, PNG, WebP, GIF, BMP), as for uploads;
* ``mask`` — a PNG mask of the photo's size: opaque pixels if it has transparency, else
  non-black pixels;
* ``rle`` — a COCO RLE ``{"size": [H, W], "counts": "..."}`` as JSON, or a JSON list of them;
* ``box`` — ``[x, y, w, h]`` in pixels as JSON, or a JSON list of boxes.

Masks are taken in that order: every ``mask`` part, then every RLE, then every box.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
from fastapi import HTTPException, Request, status

from regionsearch.api.deps import AppState
from regionsearch.api.routes.images import probe_image
from regionsearch.api.schemas import RLE_EXAMPLE
from regionsearch.api.upload_body import multipart_body, read_form
from regionsearch.search.query_masks import (
    mask_from_box,
    mask_from_png,
    mask_from_rle,
    mask_list,
    parse_json,
)

FIELDS = ("file", "mask", "rle", "box")


def form_body(mask_help: str) -> dict:
    """``openapi_extra`` documenting the multipart fields of a stateless route."""
    return multipart_body(
        {
            "file": {
                "type": "string",
                "format": "binary",
                "description": "the photo: JPEG, PNG, WebP, GIF or BMP, within the server's "
                "upload limits; it is not stored",
            },
            "mask": {
                "type": "string",
                "format": "binary",
                "description": "a PNG mask of the photo's size (opaque pixels if it has "
                "transparency, else non-black pixels). " + mask_help,
            },
            "rle": {
                "type": "string",
                "description": "COCO RLE as JSON, or a JSON list of them. " + mask_help,
                "examples": [json.dumps(RLE_EXAMPLE)],
            },
            "box": {
                "type": "string",
                "description": "[x, y, w, h] in pixels as JSON, or a JSON list of boxes. "
                + mask_help,
                "examples": ["[12, 10, 28, 20]"],
            },
        },
        encoding={"mask": {"contentType": "image/png"}},
    )


@dataclass
class ExampleForm:
    """The decoded photo and the masks sent with it, each with the field it came from."""

    pixels: np.ndarray
    masks: list[np.ndarray]
    kinds: list[str]

    @property
    def hw(self) -> tuple[int, int]:
        return int(self.pixels.shape[0]), int(self.pixels.shape[1])


def _text(raw: bytes, name: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, f"field {name!r} is not UTF-8 text"
        ) from None


async def read_example_form(request: Request, state: AppState) -> ExampleForm:
    """Read and check the body (413/415/422 as for uploads), decode the photo as the indexer
    decodes files and turn every mask field into a full-image mask (422 naming the field)."""
    from regionsearch.api.upload_body import one_file
    from regionsearch.image_io import ImageDecodeError, decode_bytes

    settings = state.settings
    form = await read_form(request, settings.max_upload_bytes, frozenset(FIELDS))
    if form.unknown:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"unknown form field(s) {', '.join(map(repr, form.unknown))}; "
            f"this route takes {', '.join(FIELDS)}",
        )
    data = one_file(form)
    probe_image(data, settings.max_image_pixels, verify=False)  # header: format, size
    try:
        pixels = decode_bytes(data, name="file", max_pixels=settings.max_image_pixels)
    except ImageDecodeError as exc:
        raise HTTPException(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE, str(exc)) from None
    hw = (int(pixels.shape[0]), int(pixels.shape[1]))
    masks: list[np.ndarray] = []
    kinds: list[str] = []
    for n, raw in enumerate(form.values("mask")):
        masks.append(mask_from_png(raw, hw, f"mask #{n + 1}"))
        kinds.append("mask")
    for n, raw in enumerate(form.values("rle")):
        value = parse_json(_text(raw, "rle"), f"rle #{n + 1}")
        items = mask_list(value, f"rle #{n + 1}") if isinstance(value, list) else [value]
        masks.extend(mask_from_rle(v, hw, f"rle #{n + 1}") for v in items)
        kinds.extend("rle" for _ in items)
    for n, raw in enumerate(form.values("box")):
        value = parse_json(_text(raw, "box"), f"box #{n + 1}")
        nested = isinstance(value, list) and bool(value) and isinstance(value[0], list)
        items = mask_list(value, f"box #{n + 1}") if nested else [value]
        masks.extend(mask_from_box(v, hw, f"box #{n + 1}") for v in items)
        kinds.extend("box" for _ in items)
    return ExampleForm(pixels, masks, kinds)


def index_embedder(state: AppState) -> object:
    """The index's embedder with its recorded options (409 when this server cannot build it)."""
    from regionsearch.store.manifest import EmbedderMismatchError

    try:
        return state.embedder_for(state.index.manifest)
    except EmbedderMismatchError as exc:
        raise HTTPException(
            status.HTTP_409_CONFLICT, f"this server cannot embed like the index: {exc}"
        ) from exc
