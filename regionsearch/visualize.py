"""Pictures a person can look at: heat maps over images, mask outlines, contact sheets."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw
from skimage.segmentation import find_boundaries

PALETTE: tuple[tuple[int, int, int], ...] = (
    (255, 64, 64),
    (64, 160, 255),
    (255, 200, 0),
    (64, 220, 120),
    (200, 100, 255),
    (255, 128, 0),
)


def heatmap_overlay(image: np.ndarray, heat: np.ndarray, opacity: float = 0.5) -> np.ndarray:
    """Blend a ``(H, W)`` map in [0, 1] (jet colours) over an ``(H, W, 3)`` uint8 image."""
    from matplotlib import colormaps

    if heat.shape != image.shape[:2]:
        heat = (
            np.asarray(
                Image.fromarray((heat * 255).astype(np.uint8)).resize(
                    (image.shape[1], image.shape[0]), Image.Resampling.BILINEAR
                ),
                dtype=np.float32,
            )
            / 255.0
        )
    colours = colormaps["jet"](np.clip(heat, 0, 1))[..., :3] * 255
    return ((1 - opacity) * image + opacity * colours).astype(np.uint8)


def outline_masks(
    image: np.ndarray,
    masks: Sequence[np.ndarray],
    colours: Sequence[tuple[int, int, int]] = PALETTE,
    thickness: int = 2,
    fill_opacity: float = 0.25,
) -> np.ndarray:
    """Draw each boolean mask's outline (and a light fill) on a copy of ``image``."""
    from scipy.ndimage import binary_dilation

    out = image.astype(np.float32).copy()
    for index, mask in enumerate(masks):
        colour = np.array(colours[index % len(colours)], dtype=np.float32)
        out[mask] = (1 - fill_opacity) * out[mask] + fill_opacity * colour
        edge = find_boundaries(mask, mode="inner")
        if thickness > 1:
            edge = binary_dilation(edge, iterations=thickness - 1) & mask
        out[edge] = colour
    return out.astype(np.uint8)


def labelled_panel(
    tiles: Sequence[np.ndarray], labels: Sequence[str], tile_size: int = 256, columns: int = 4
) -> Image.Image:
    """A grid of images, each scaled to ``tile_size`` wide with a caption under it."""
    if not tiles:
        raise ValueError("nothing to draw")
    caption = 18
    columns = max(1, min(columns, len(tiles)))
    rows = (len(tiles) + columns - 1) // columns
    scaled = []
    for tile in tiles:
        height = max(1, round(tile.shape[0] * tile_size / tile.shape[1]))
        scaled.append(Image.fromarray(tile).resize((tile_size, height), Image.Resampling.BILINEAR))
    cell_height = max(t.height for t in scaled) + caption
    sheet = Image.new("RGB", (columns * tile_size, rows * cell_height), "white")
    draw = ImageDraw.Draw(sheet)
    for index, (tile, label) in enumerate(zip(scaled, labels, strict=True)):
        x, y = (index % columns) * tile_size, (index // columns) * cell_height
        sheet.paste(tile, (x, y))
        draw.text((x + 4, y + tile.height + 2), label[:40], fill="black")
    return sheet
