"""Open photos safely: EXIF orientation applied, RGB, corrupt or truncated files rejected.

Shared by every layer that reads a photo (the indexer, search's overlays, the API, eval and the
mask sources), so that what is shown or evaluated is exactly what was embedded.

``Image.verify()`` only checks a file's structure and misses truncated pixel data, so images
are fully decoded (``load()``) and every decoder failure becomes one :class:`ImageDecodeError`
with a short reason the indexer stores with the failed image.

Large photos: with ``max_side`` a JPEG is decoded at a reduced scale (``Image.draft``: the DCT
scales by 1/2, 1/4 or 1/8), so a 200 MP photo costs what its reduced size costs; other formats
are decoded in full and then downscaled. ``max_pixels`` bounds what is *decoded* (after any
draft reduction) and raises :class:`ImageTooLargeError` above it. High-bit-depth images (16-bit
grey PNG/TIFF, 32-bit integer and float modes) are scaled to 8 bits, never clipped.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from regionsearch import DEFAULT_MAX_PIXELS
from regionsearch.errors import InvalidImageError

HASH_CHUNK = 1 << 20

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})


class ImageDecodeError(InvalidImageError):
    """A file could not be decoded as an image (corrupt, truncated, empty, too large...)."""


class ImageTooLargeError(ImageDecodeError):
    """An image has more pixels than the configured limit (a decompression bomb, or just huge)."""


def configure_pillow(max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:
    """Process-wide Pillow settings for a command-line run (call once, at the entry point).

    Pillow refuses to *open* anything above twice its ``MAX_IMAGE_PIXELS`` and warns above it;
    its threshold follows ``max_pixels`` so that :func:`decode_bytes` makes the decision (with a
    message naming the limit) and no ``DecompressionBombWarning`` breaks a progress bar.
    Library users who keep Pillow's defaults get the same errors for images above them.
    """
    import warnings

    Image.MAX_IMAGE_PIXELS = max_pixels
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def _megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:.1f} MP"


def _to_8bit(im: Image.Image) -> Image.Image:
    """Scale high-bit-depth modes to 8 bits (Pillow's ``convert`` clips them at 255)."""
    if im.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(im, dtype=np.float64) / 257.0
    elif im.mode == "I":  # 32-bit integers: 16-bit data in practice (PNG, TIFF)
        values = np.asarray(im, dtype=np.float64)
        values = values / 257.0 if values.max(initial=0) > 255 else values
    elif im.mode == "F":  # floats: [0, 1] when they fit, else taken as 0..255
        values = np.asarray(im, dtype=np.float64)
        values = values * 255.0 if values.max(initial=0) <= 1.0 else values
    else:
        return im
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")


def _reduced_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    longest = max(width, height)
    if not max_side or longest <= max_side:
        return width, height
    scale = max_side / longest
    return max(1, round(width * scale)), max(1, round(height * scale))


@dataclass
class DecodedImage:
    """One decoded photo plus what was read.

    ``pixels`` (H, W, 3) uint8 after EXIF transpose (and the ``max_side`` reduction, if any);
    ``width``/``height`` are the photo's own size after EXIF transpose, before any reduction.
    """

    pixels: np.ndarray
    content_hash: str  # sha256 hex of the bytes that were decoded
    size_bytes: int
    mtime: float
    width: int
    height: int


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 hex of a file, streamed in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def decode_bytes(
    data: bytes,
    *,
    name: str = "image",
    max_side: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    exif_transpose: bool = True,
) -> np.ndarray:
    """Decode ``data`` to an (H, W, 3) uint8 RGB array with EXIF orientation applied.

    With ``max_side`` the result's longest side is at most ``max_side`` (aspect kept; JPEGs are
    decoded at a reduced scale first). Raises :class:`ImageTooLargeError` when more than
    ``max_pixels`` would have to be decoded, :class:`ImageDecodeError` for anything unreadable.
    ``exif_transpose=False`` keeps the stored orientation (for datasets annotated on raw pixels).
    """
    return _decode(data, name, max_side, max_pixels, exif_transpose)[0]


_TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})  # EXIF orientations that swap width/height


def _shown_size(im: Image.Image) -> tuple[int, int]:
    """(width, height) of an opened image as displayed: EXIF orientation 5-8 swaps them."""
    width, height = im.size
    if im.getexif().get(0x0112, 1) in _TRANSPOSING_ORIENTATIONS:
        return height, width
    return width, height


def _decode(
    data: bytes,
    name: str,
    max_side: int | None,
    max_pixels: int | None,
    exif_transpose: bool = True,
) -> tuple[np.ndarray, tuple[int, int]]:
    """Pixels (see :func:`decode_bytes`) and the photo's own (width, height) after EXIF."""
    if not data:
        raise ImageDecodeError(f"{name}: empty file (0 bytes)")
    try:
        with Image.open(io.BytesIO(data)) as im:  # > 2x Pillow's MAX_IMAGE_PIXELS raises here
            size = _shown_size(im) if exif_transpose else im.size
            im.draft("RGB", _reduced_size(im.width, im.height, max_side))  # JPEG only; else no-op
            if max_pixels and im.width * im.height > max_pixels:
                raise ImageTooLargeError(
                    f"{name}: {im.width}x{im.height} pixels ({_megapixels(im.width * im.height)}) "
                    f"is over the limit of {_megapixels(max_pixels)} (raise it with --max-pixels"
                    + (
                        ", or pass --max-side to decode JPEGs at a reduced size)"
                        if not max_side
                        else ")"
                    )
                )
            im.load()  # full decode: truncated data raises here, not in verify()
            if exif_transpose:
                im = ImageOps.exif_transpose(im)
            im = _to_8bit(im)
            if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                im = im.convert("RGBA")
                background = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(background, im)
            pixels = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except UnidentifiedImageError:
        raise ImageDecodeError(f"{name}: not a recognised image format") from None
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(
            f"{name}: too many pixels ({exc}; raise the limit with --max-pixels)"
        ) from None
    except ImageDecodeError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
        # OSError: "image file is truncated", "broken data stream", ...; SyntaxError: bad headers
        raise ImageDecodeError(
            f"{name}: corrupt or truncated image ({type(exc).__name__}: {exc})"
        ) from None
    if pixels.ndim != 3 or pixels.shape[0] == 0 or pixels.shape[1] == 0:
        raise ImageDecodeError(f"{name}: image has no pixels (shape {pixels.shape})")
    return downscale(pixels, max_side), size


def decode_image(
    path: str | os.PathLike[str],
    *,
    name: str | None = None,
    max_side: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> DecodedImage:
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
    pixels, (width, height) = _decode(data, label, max_side, max_pixels)
    return DecodedImage(
        pixels=pixels,
        content_hash=hashlib.sha256(data).hexdigest(),
        size_bytes=int(st.st_size),
        mtime=st.st_mtime_ns / 1e9,
        width=width,
        height=height,
    )


def read_rgb(
    path: str | os.PathLike[str],
    *,
    name: str | None = None,
    max_side: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """The pixels of ``path`` exactly as the indexer embeds them (see :func:`decode_bytes`).

    For every place that shows or re-reads a stored photo (overlays, thumbnails, uploads), so
    that what a user sees is what was embedded. Raises :class:`ImageDecodeError`.
    """
    label = name or str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ImageDecodeError(f"{label}: cannot read file: {exc.strerror or exc}") from None
    return decode_bytes(data, name=label, max_side=max_side, max_pixels=max_pixels)


def displayed_size(path: str | os.PathLike[str]) -> tuple[int, int]:
    """(width, height) of a photo as displayed (EXIF orientation applied), from its header only.

    For annotation files that leave an image's size out. Raises :class:`ImageDecodeError`.
    """
    try:
        with Image.open(path) as im:
            return _shown_size(im)
    except UnidentifiedImageError:
        raise ImageDecodeError(f"{path}: not a recognised image format") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(f"{path}: unreadable image header ({exc})") from None


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
