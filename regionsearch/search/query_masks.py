"""Masks a client sends with a query (a PNG, a COCO RLE or a box) → full-image bool masks.

Query by example and stateless referring expressions take regions drawn by an app, not by the
indexer. Each form is checked against the photo's size as decoded (EXIF applied), and any
problem is one :class:`~regionsearch.errors.InvalidMaskError` sentence naming the input.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from regionsearch.errors import InvalidMaskError
from regionsearch.masks import rle as rle_mod


def _check(mask: np.ndarray, hw: tuple[int, int], what: str) -> np.ndarray:
    if mask.shape != tuple(hw):
        raise InvalidMaskError(
            f"{what} is {mask.shape[1]}x{mask.shape[0]} pixels but the image is "
            f"{hw[1]}x{hw[0]} (width x height, after EXIF rotation)"
        )
    if not mask.any():
        raise InvalidMaskError(f"{what} is empty (no foreground pixel)")
    return mask


def mask_from_png(data: bytes, hw: tuple[int, int], what: str = "mask") -> np.ndarray:
    """A PNG (or any image Pillow reads) as a mask: opaque pixels when it has transparency,
    else non-black pixels. It must have the photo's size."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.mode in ("RGBA", "LA", "PA") or "transparency" in im.info:
                mask = np.asarray(im.convert("RGBA"))[..., 3] > 0
            else:
                mask = np.asarray(im.convert("L")) > 0
    except Exception as exc:  # Pillow raises many types for bad input
        raise InvalidMaskError(f"{what} is not an image Pillow can read") from exc
    return _check(mask, hw, what)


def mask_from_rle(rle: Any, hw: tuple[int, int], what: str = "rle") -> np.ndarray:
    """A COCO RLE ``{"size": [H, W], "counts": ...}`` (compressed or list counts) as a mask."""
    if not isinstance(rle, Mapping) or "size" not in rle or "counts" not in rle:
        raise InvalidMaskError(
            f'{what} must be a COCO RLE object {{"size": [H, W], "counts": ...}}'
        )
    size = rle["size"]
    if not (
        isinstance(size, Sequence) and len(size) == 2 and all(isinstance(v, int) for v in size)
    ):
        raise InvalidMaskError(f"{what}: 'size' must be [height, width] in whole pixels")
    if list(size) != list(hw):
        raise InvalidMaskError(
            f"{what} has size [H, W] = {list(size)} but the image is {list(hw)} "
            "(height, width after EXIF rotation)"
        )
    try:
        mask = rle_mod.decode(rle)
    except Exception as exc:  # pycocotools raises ValueError/TypeError for bad counts
        raise InvalidMaskError(f"{what}: 'counts' is not a valid COCO RLE") from exc
    return _check(mask, hw, what)


def mask_from_box(box: Any, hw: tuple[int, int], what: str = "box") -> np.ndarray:
    """A box ``[x, y, w, h]`` in pixels (COCO convention) as a mask of the pixels it touches,
    clipped to the image."""
    if not (
        isinstance(box, Sequence)
        and not isinstance(box, str)
        and len(box) == 4
        and all(isinstance(v, int | float) and math.isfinite(v) for v in box)
    ):
        raise InvalidMaskError(f"{what} must be four numbers [x, y, width, height] in pixels")
    x, y, w, h = (float(v) for v in box)
    if w <= 0 or h <= 0:
        raise InvalidMaskError(f"{what} must have a positive width and height, got {list(box)}")
    height, width = hw
    x0, y0 = max(math.floor(x), 0), max(math.floor(y), 0)
    x1, y1 = min(math.ceil(x + w), width), min(math.ceil(y + h), height)
    if x0 >= x1 or y0 >= y1:
        raise InvalidMaskError(f"{what} {list(box)} lies outside the {width}x{height} image")
    mask = np.zeros(hw, dtype=bool)
    mask[y0:y1, x0:x1] = True
    return mask


def parse_json(text: str, what: str) -> Any:
    """A JSON form field, or a one-line error naming it."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidMaskError(f"{what} is not valid JSON ({exc.msg})") from None


def mask_list(value: Any, what: str) -> list[Any]:
    """A JSON value that must be a non-empty list (of RLEs or boxes)."""
    if not isinstance(value, list) or not value:
        raise InvalidMaskError(f"{what} must be a non-empty JSON list")
    return value


def as_masks(masks: Any, hw: tuple[int, int]) -> np.ndarray:
    """Candidate masks given to the Python API: an ``(M, H, W)`` array, a list of ``(H, W)``
    arrays, or a list of COCO RLE dicts → ``(M, H, W)`` bool."""
    if isinstance(masks, np.ndarray):
        arr = masks[None] if masks.ndim == 2 else masks
        if arr.ndim != 3:
            raise InvalidMaskError(f"masks must be (M, H, W) or (H, W), got shape {masks.shape}")
        items: list[np.ndarray] = [_check(m != 0, hw, f"mask {i}") for i, m in enumerate(arr)]
    else:
        items = []
        for i, m in enumerate(masks):
            if isinstance(m, Mapping):
                items.append(mask_from_rle(m, hw, f"mask {i}"))
            else:
                items.append(_check(np.asarray(m) != 0, hw, f"mask {i}"))
    if not items:
        raise InvalidMaskError("masks is empty: give at least one mask, or None for proposals")
    return np.stack(items)
