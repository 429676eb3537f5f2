"""Open photos safely: EXIF orientation applied, RGB, corrupt or truncated files rejected.

``Image.verify()`` only checks a file's structure and misses truncated pixel data, so images
are fully decoded (``load()``) and every decoder failure becomes one :class:`ImageDecodeError`
with a short reason the indexer stores with the failed image.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from regionsearch.errors import InvalidImageError

HASH_CHUNK = 1 << 20


class ImageDecodeError(InvalidImageError):
    """A file could not be decoded as an image (corrupt, truncated, empty, too large...)."""


@dataclass
class DecodedImage:
    """One decoded photo plus what was read: ``pixels`` (H, W, 3) uint8 after EXIF transpose."""

    pixels: np.ndarray
    content_hash: str  # sha256 hex of the bytes that were decoded
    size_bytes: int
    mtime: float

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 hex of a file, streamed in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def decode_bytes(data: bytes, *, name: str = "image") -> np.ndarray:
    """Decode ``data`` to an (H, W, 3) uint8 RGB array with EXIF orientation applied."""
    if not data:
        raise ImageDecodeError(f"{name}: empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as im:  # > 2x MAX_IMAGE_PIXELS raises here
            limit = Image.MAX_IMAGE_PIXELS
            if limit and im.width * im.height > limit:  # (warnings filters are not thread-safe)
                raise Image.DecompressionBombError(
                    f"{im.width}x{im.height} exceeds the limit of {limit} pixels"
                )
            im.load()  # full decode: truncated data raises here, not in verify()
            im = ImageOps.exif_transpose(im)
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                background = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(background, im)
            pixels = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except UnidentifiedImageError:
        raise ImageDecodeError(f"{name}: not a recognised image format") from None
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"{name}: too many pixels ({exc})") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
        # OSError: "image file is truncated", "broken data stream", ...; SyntaxError: bad headers
        raise ImageDecodeError(
            f"{name}: corrupt or truncated image ({type(exc).__name__}: {exc})"
        ) from None
    if pixels.ndim != 3 or pixels.shape[0] == 0 or pixels.shape[1] == 0:
        raise ImageDecodeError(f"{name}: image has no pixels (shape {pixels.shape})")
    return pixels


def decode_image(path: str | os.PathLike[str], *, name: str | None = None) -> DecodedImage:
    """Read ``path`` once: hash its bytes and decode them (see :func:`decode_bytes`).

    Raises :class:`ImageDecodeError` for unreadable files and undecodable images.
    """
    path = Path(path)
    label = name or str(path)
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read()
    except OSError as exc:
        raise ImageDecodeError(f"{label}: cannot read file: {exc.strerror or exc}") from None
    pixels = decode_bytes(data, name=label)
    return DecodedImage(
        pixels=pixels,
        content_hash=hashlib.sha256(data).hexdigest(),
        size_bytes=int(st.st_size),
        mtime=st.st_mtime_ns / 1e9,
    )


def read_rgb(path: str | os.PathLike[str], *, name: str | None = None) -> np.ndarray:
    """The pixels of ``path`` exactly as the indexer embeds them (see :func:`decode_bytes`).

    For every place that shows or re-reads a stored photo (overlays, thumbnails, uploads), so
    that what a user sees is what was embedded. Raises :class:`ImageDecodeError`.
    """
    label = name or str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ImageDecodeError(f"{label}: cannot read file: {exc.strerror or exc}") from None
    return decode_bytes(data, name=label)


def downscale(pixels: np.ndarray, max_side: int | None) -> np.ndarray:
    """Shrink so that the longest side is at most ``max_side`` (aspect kept); no-op otherwise."""
    if not max_side:
        return pixels
    h, w = pixels.shape[:2]
    longest = max(h, w)
    if longest <= max_side:
        return pixels
    scale = max_side / longest
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BILINEAR))
