"""Pictures of search results: a region outlined on its image, contact sheets with scores."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from regionsearch.indexer.decode import ImageDecodeError, read_rgb
from regionsearch.masks import rle as rle_mod
from regionsearch.search.searcher import RegionHit
from regionsearch.visualize import PALETTE, labelled_panel, outline_masks


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


def overlay_png(path: Path, rles: Sequence[dict], max_side: int = 1024) -> Image.Image:
    """The image at ``path`` with ``rles`` outlined, as a PIL image."""
    return Image.fromarray(outline_regions(load_rgb(path, max_side), rles))


def contact_sheet(
    hits: Sequence[RegionHit],
    files: Sequence[Path],
    tile_size: int = 256,
    columns: int = 4,
) -> Image.Image:
    """One tile per hit (its region outlined) captioned with rank, score and file name."""
    tiles, labels = [], []
    for rank, (hit, path) in enumerate(zip(hits, files, strict=True), start=1):
        try:
            tile = outline_regions(load_rgb(path, max_side=2 * tile_size), [hit.rle])
        except ImageDecodeError:  # moved or unreadable since it was indexed: a grey tile
            tile = np.full((tile_size, tile_size, 3), 200, np.uint8)
        tiles.append(tile)
        labels.append(f"#{rank} {hit.score:.3f} {Path(hit.image_path).name}")
    return labelled_panel(tiles, labels, tile_size=tile_size, columns=columns)
