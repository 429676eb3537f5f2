"""Pictures of search results: a region outlined on its image, contact sheets with scores."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from regionsearch.image_io import ImageDecodeError, read_rgb
from regionsearch.masks import rle as rle_mod
from regionsearch.search.searcher import RegionHit
from regionsearch.visualize import PALETTE, outline_masks


def load_rgb(path: Path, max_side: int | None = None) -> np.ndarray:
    """The image as ``(H, W, 3)`` uint8, decoded as when indexing, longest side <= ``max_side``.

    JPEGs decode at a reduced scale when ``max_side`` allows (thumbnails cost what they show).
    """
    return read_rgb(path, max_side=max_side)


def _fit(mask: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    if mask.shape == hw:
        return mask
    img = Image.fromarray(mask.astype(np.uint8) * 255).resize((hw[1], hw[0]), Image.NEAREST)
    return np.asarray(img) > 127


def outline_regions(
    image: np.ndarray,
    rles: Sequence[dict],
    colours: Sequence[tuple[int, int, int]] = PALETTE,
    thickness: int | None = None,
    fill_opacity: float = 0.25,
) -> np.ndarray:
    """``image`` with each RLE mask outlined (masks rescaled if the image was downsized).

    ``fill_opacity=0`` draws outlines only: use it for context regions, whose fills would pile
    up (an image's regions overlap, and one of them is the whole image).
    """
    hw = image.shape[:2]
    masks = [_fit(rle_mod.decode(r), hw) for r in rles]
    if thickness is None:
        thickness = max(2, round(max(hw) / 200))
    return outline_masks(
        image, masks, colours=colours, thickness=thickness, fill_opacity=fill_opacity
    )


#: Brightness kept outside a spotlit region: the context stays readable, the region stands out.
DIM = 0.35
SPOTLIGHT_EDGE = (255, 214, 0)


def erode(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary erosion of ``mask`` by a (2r+1)² square, as two separable passes of shifted ANDs
    (a few array operations; Pillow's MinFilter costs ~40x more at radius 3). Outside the
    image counts as inside the mask, so a region touching the border gets no edge there."""
    out = mask.copy()
    for axis in (0, 1):
        src = out.copy()
        n = src.shape[axis]
        for shift in range(1, min(radius, n - 1) + 1):
            lead = [slice(None)] * 2
            lag = [slice(None)] * 2
            lead[axis], lag[axis] = slice(shift, None), slice(None, -shift)
            out[tuple(lead)] &= src[tuple(lag)]
            out[tuple(lag)] &= src[tuple(lead)]
    return out


def spotlight(
    image: np.ndarray,
    rle: dict,
    dim: float = DIM,
    colour: tuple[int, int, int] = SPOTLIGHT_EDGE,
    thickness: int | None = None,
) -> np.ndarray:
    """``image`` with everything outside the region dimmed to ``dim`` and the region's edge
    drawn in ``colour``: the match is found at a glance, its context still visible."""
    hw = image.shape[:2]
    mask = _fit(rle_mod.decode(rle), hw)
    if thickness is None:
        thickness = max(2, round(max(hw) / 160))
    dimmed = (image.astype(np.uint16) * round(dim * 256) >> 8).astype(np.uint8)
    out = np.where(mask[..., None], image, dimmed)
    out[mask & ~erode(mask, thickness)] = colour
    return out


def encode_picture(pixels: np.ndarray | Image.Image, fmt: str = "jpeg", quality: int = 85) -> bytes:
    """``pixels`` as JPEG (``quality``; ~50x cheaper to encode than PNG) or PNG bytes."""
    picture = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    buf = io.BytesIO()
    if fmt.lower() in ("jpeg", "jpg"):
        picture.save(buf, format="JPEG", quality=quality)
    elif fmt.lower() == "png":
        picture.save(buf, format="PNG")
    else:
        raise ValueError(f"unknown picture format {fmt!r}: use jpeg or png")
    return buf.getvalue()


def region_picture(path: Path, rle: dict, max_side: int = 1024) -> np.ndarray:
    """The image at ``path`` (longest side <= ``max_side``) with the region spotlit."""
    return spotlight(load_rgb(path, max_side), rle)


def overlay_png(path: Path, rles: Sequence[dict], max_side: int = 1024) -> Image.Image:
    """The image at ``path`` with ``rles`` outlined, as a PIL image."""
    return Image.fromarray(outline_regions(load_rgb(path, max_side), rles))


def _font(size: int):
    """Pillow's bundled scalable font at ``size`` pixels (legible at any tile size)."""
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def contact_sheet(
    hits: Sequence[RegionHit],
    files: Sequence[Path],
    tile_size: int = 256,
    columns: int = 4,
    query: str | None = None,
) -> Image.Image:
    """One tile per hit, its region spotlit (the rest dimmed), captioned with rank, score and
    file name; ``query`` titles the sheet."""
    if not hits:
        raise ValueError("nothing to draw")
    from PIL import ImageDraw

    columns = max(1, min(columns, len(hits)))
    rows = (len(hits) + columns - 1) // columns
    text_size = max(12, tile_size // 14)
    caption = 2 * text_size + 10
    title = 2 * text_size + 8 if query else 0
    pad = 6
    cell_w, cell_h = tile_size + pad, tile_size + caption + pad
    sheet = Image.new("RGB", (columns * cell_w + pad, title + rows * cell_h + pad), "white")
    draw = ImageDraw.Draw(sheet)
    small, big = _font(text_size), _font(round(text_size * 1.4))
    if query:
        draw.text((pad, pad), f"\u201c{query}\u201d - top {len(hits)}", fill="black", font=big)
    for rank, (hit, path) in enumerate(zip(hits, files, strict=True), start=1):
        try:
            tile = region_picture(path, hit.rle, max_side=2 * tile_size)
        except ImageDecodeError:  # moved or unreadable since it was indexed: a grey tile
            tile = np.full((tile_size, tile_size, 3), 200, np.uint8)
        picture = Image.fromarray(tile)
        scale = tile_size / max(picture.size)  # up or down: small photos fill their tile too
        picture = picture.resize(
            (max(1, round(picture.width * scale)), max(1, round(picture.height * scale))),
            Image.Resampling.BILINEAR,
        )
        x = pad + ((rank - 1) % columns) * cell_w
        y = title + pad + ((rank - 1) // columns) * cell_h
        sheet.paste(picture, (x + (tile_size - picture.width) // 2, y))
        text_y = y + tile_size + 2
        draw.text((x, text_y), f"#{rank}  score {hit.score:.3f}", fill="black", font=small)
        name = Path(hit.image_path).name
        if len(name) > 28:
            name = "\u2026" + name[-27:]
        draw.text((x, text_y + text_size + 2), name, fill=(70, 70, 70), font=small)
    return sheet
