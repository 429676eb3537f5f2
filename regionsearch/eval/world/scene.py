"""Render synthetic scenes of coloured shapes with exact, occlusion-aware instance masks.

Shapes are drawn with Pillow on a supersampled local patch and area-downsampled, which gives
anti-aliased edges cheaply (only the object's own patch is supersampled, not the canvas). Each
object's coverage ``alpha`` is composited in order; an object's mask is where its *visible*
coverage (its alpha times what later objects leave uncovered) is at least one half, so masks
are exact after occlusion and never overlap.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from regionsearch.eval.world.vocab import (
    BACKGROUND_PALETTE,
    COLOUR_JITTER,
    COLOUR_NAMES,
    COLOURS,
    SHAPES,
)

BACKGROUND_KINDS: tuple[str, ...] = ("flat", "gradient", "noise", "clutter")

#: Shapes whose look does not change with rotation (up to the shape's symmetry), so they may be
#: drawn at any angle; the others keep small tilts so a square never turns into a diamond.
_FREE_ROTATION = {"circle", "ring", "star", "hexagon"}


@dataclass(frozen=True)
class ObjectRecord:
    """One rendered object. Coordinates are in pixels of the rendered canvas.

    ``size`` is the diameter of the object's circumscribing circle; ``bbox`` is ``[x, y, w, h]``
    of the *visible* mask; ``area`` is its visible pixel count and ``full_area`` the count it
    would have without occlusion (so ``area / full_area`` is the visible fraction).
    """

    colour: str
    shape: str
    centre: tuple[float, float]
    size: float
    rotation: float
    rgb: tuple[int, int, int]
    bbox: tuple[int, int, int, int]
    area: int
    full_area: int
    #: Fill of the object (world v2): ``flat`` or a pattern with ``secondary_rgb`` on a minority.
    pattern: str = "flat"
    secondary_colour: str | None = None
    secondary_rgb: tuple[int, int, int] | None = None

    @property
    def name(self) -> str:
        """Class name ``"{colour} {shape}"``."""
        return f"{self.colour} {self.shape}"


@dataclass
class Scene:
    """A rendered scene: ``image`` (H, W, 3) uint8, ``masks`` (M, H, W) bool, one record per mask."""

    image: np.ndarray
    masks: np.ndarray
    objects: list[ObjectRecord] = field(default_factory=list)
    background: str = "flat"


def _as_hw(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def shape_polygon(shape: str, cx: float, cy: float, radius: float, rotation: float) -> list:
    """Vertices of a polygonal shape (not circle/ring) inscribed in a circle of ``radius``."""

    def rotate(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
        c, s = math.cos(rotation), math.sin(rotation)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in points]

    r = radius
    if shape == "square":
        h = r / math.sqrt(2.0)
        return rotate([(-h, -h), (h, -h), (h, h), (-h, h)])
    if shape == "triangle":
        # Equilateral, pointing up; centred on its circumcentre but nudged down so it fills the box.
        return rotate(
            [
                (0.0, -r),
                (r * math.sin(math.radians(120)), r * 0.5),
                (-r * math.sin(math.radians(120)), r * 0.5),
            ]
        )
    if shape == "diamond":
        # A rhombus taller than wide: unmistakable from a 45-degree square at small tilts.
        return rotate([(0.0, -r), (0.62 * r, 0.0), (0.0, r), (-0.62 * r, 0.0)])
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.42 * r
            ang = -math.pi / 2 + k * math.pi / 5
            pts.append((rad * math.cos(ang), rad * math.sin(ang)))
        return rotate(pts)
    if shape == "cross":
        a, b = 0.3 * r, 0.95 * r / math.sqrt(1.0 + 0.1)
        return rotate(
            [
                (-a, -b),
                (a, -b),
                (a, -a),
                (b, -a),
                (b, a),
                (a, a),
                (a, b),
                (-a, b),
                (-a, a),
                (-b, a),
                (-b, -a),
                (-a, -a),
            ]
        )
    if shape == "hexagon":
        return rotate(
            [(r * math.cos(k * math.pi / 3), r * math.sin(k * math.pi / 3)) for k in range(6)]
        )
    raise ValueError(f"unknown polygonal shape {shape!r}")


def shape_coverage(
    shape: str,
    centre: tuple[float, float],
    size: float,
    rotation: float,
    hw: tuple[int, int],
    supersample: int = 4,
) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of one shape on an ``hw`` canvas (float32 array).

    Only the shape's bounding patch is drawn at ``supersample`` times the resolution and
    box-downsampled, so the cost does not grow with the canvas size.
    """
    height, width = hw
    cx, cy = centre
    radius = size / 2.0
    x0 = max(0, math.floor(cx - radius) - 1)
    y0 = max(0, math.floor(cy - radius) - 1)
    x1 = min(width, math.ceil(cx + radius) + 2)
    y1 = min(height, math.ceil(cy + radius) + 2)
    out = np.zeros(hw, dtype=np.float32)
    if x1 <= x0 or y1 <= y0:
        return out
    ss = supersample
    pw, ph = (x1 - x0) * ss, (y1 - y0) * ss
    patch = Image.new("L", (pw, ph), 0)
    draw = ImageDraw.Draw(patch)
    # Pixel (i, j) of the canvas covers [j, j+1) x [i, i+1); sample centres are at +0.5.
    lcx, lcy, lr = (cx - x0) * ss, (cy - y0) * ss, radius * ss
    if shape == "circle":
        draw.ellipse([lcx - lr, lcy - lr, lcx + lr, lcy + lr], fill=255)
    elif shape == "ring":
        inner = 0.58 * lr
        draw.ellipse([lcx - lr, lcy - lr, lcx + lr, lcy + lr], fill=255)
        draw.ellipse([lcx - inner, lcy - inner, lcx + inner, lcy + inner], fill=0)
    else:
        draw.polygon(shape_polygon(shape, lcx, lcy, lr, rotation), fill=255)
    small = np.asarray(patch, dtype=np.float32).reshape(y1 - y0, ss, x1 - x0, ss).mean(axis=(1, 3))
    out[y0:y1, x0:x1] = small / 255.0
    return out


def render_background(rng: np.random.Generator, hw: tuple[int, int], kind: str) -> np.ndarray:
    """A float32 (H, W, 3) background in muted mid-tones that never resemble an object colour."""
    height, width = hw
    palette = np.asarray(BACKGROUND_PALETTE, dtype=np.float32)
    base = palette[rng.integers(len(palette))]
    if kind == "flat":
        return np.broadcast_to(base, (height, width, 3)).copy()
    if kind == "gradient":
        other = palette[rng.integers(len(palette))]
        angle = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
        t = (xx / max(width - 1, 1) - 0.5) * math.cos(angle) + (
            yy / max(height - 1, 1) - 0.5
        ) * math.sin(angle)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        return base[None, None] * (1 - t[..., None]) + other[None, None] * t[..., None]
    if kind == "noise":
        # Low-frequency blotches plus fine grain: texture without any object-like colour.
        coarse = rng.normal(0.0, 12.0, size=(max(2, height // 16), max(2, width // 16), 1))
        coarse_img = np.asarray(
            Image.fromarray(coarse[..., 0].astype(np.float32), mode="F").resize(
                (width, height), Image.Resampling.BILINEAR
            )
        )
        grain = rng.normal(0.0, 6.0, size=(height, width, 3))
        return base[None, None] + coarse_img[..., None] + grain
    if kind == "clutter":
        # Distractor blobs and strokes in other background tones: shape-like, never object-coloured.
        canvas = Image.new("RGB", (width, height), tuple(int(v) for v in base))
        draw = ImageDraw.Draw(canvas)
        for _ in range(int(rng.integers(4, 12))):
            colour = tuple(int(v) for v in palette[rng.integers(len(palette))])
            x, y = rng.uniform(0, width), rng.uniform(0, height)
            r = rng.uniform(0.04, 0.18) * min(height, width)
            kind_k = int(rng.integers(3))
            if kind_k == 0:
                draw.ellipse([x - r, y - r * rng.uniform(0.3, 1), x + r, y + r], fill=colour)
            elif kind_k == 1:
                draw.rectangle([x - r, y - r / 2, x + r, y + r / 2], fill=colour)
            else:
                x2, y2 = rng.uniform(0, width), rng.uniform(0, height)
                draw.line([x, y, x2, y2], fill=colour, width=max(1, int(r / 4)))
        return np.asarray(canvas, dtype=np.float32)
    raise ValueError(f"unknown background kind {kind!r}; choose one of {BACKGROUND_KINDS}")


def _jittered_rgb(rng: np.random.Generator, colour: str) -> tuple[int, int, int]:
    base = np.asarray(COLOURS[colour], dtype=np.int64)
    rgb = np.clip(base + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, size=3), 0, 255)
    return (int(rgb[0]), int(rgb[1]), int(rgb[2]))


def _rotation(rng: np.random.Generator, shape: str) -> float:
    if shape in _FREE_ROTATION:
        return float(rng.uniform(0, 2 * math.pi))
    return float(rng.uniform(-math.radians(15), math.radians(15)))


def visible_masks(visible: np.ndarray) -> np.ndarray:
    """``(K, H, W)`` visible coverages (bottom to top) → non-overlapping boolean masks.

    Visible coverages sum to at most 1, so at most one can exceed one half; argmax breaks the
    exact-0.5 tie (topmost object wins) so masks never overlap.
    """
    if not len(visible):
        return np.zeros(visible.shape, dtype=bool)
    top = len(visible) - 1 - np.argmax(visible[::-1], axis=0)
    return (visible >= 0.5) & (np.arange(len(visible))[:, None, None] == top[None])


def render_scene(
    rng: np.random.Generator,
    size: int | tuple[int, int] = 224,
    n_objects: int | None = None,
    min_objects: int = 1,
    max_objects: int = 6,
    size_range: tuple[float, float] = (0.18, 0.45),
    background: str | None = None,
    min_visible: float = 0.7,
    supersample: int = 4,
    classes: list[tuple[str, str]] | None = None,
) -> Scene:
    """Render one scene.

    ``size_range`` is the object diameter as a fraction of the shorter canvas side; with many
    objects the upper bound shrinks so they fit. Objects may overlap, but every object keeps
    at least ``min_visible`` of its own area visible (placements that break this are retried
    with smaller sizes; an object that cannot be placed is dropped, never half-hidden).
    ``classes`` forces the (colour, shape) of each object, otherwise they are drawn at random.
    """
    hw = _as_hw(size)
    height, width = hw
    side = float(min(hw))
    if n_objects is None:
        n_objects = int(rng.integers(min_objects, max_objects + 1))
    if classes is not None:
        n_objects = len(classes)
    kind = (
        background
        if background is not None
        else BACKGROUND_KINDS[int(rng.integers(len(BACKGROUND_KINDS)))]
    )
    image = render_background(rng, hw, kind)

    lo, hi = size_range
    hi_n = max(lo, min(hi, 0.95 / math.sqrt(max(n_objects, 1))))
    alphas: list[np.ndarray] = []
    params: list[tuple[str, str, tuple[float, float], float, float, tuple[int, int, int]]] = []
    visible = np.zeros((0, height, width), dtype=np.float32)
    for k in range(n_objects):
        if classes is not None:
            colour, shape = classes[k]
        else:
            colour = COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))]
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
        rgb = _jittered_rgb(rng, colour)
        rotation = _rotation(rng, shape)
        placed = False
        for attempt in range(40):
            shrink = 1.0 - 0.5 * attempt / 40
            diameter = float(rng.uniform(lo, hi_n)) * side * shrink
            r = diameter / 2
            cx = float(rng.uniform(r, width - r))
            cy = float(rng.uniform(r, height - r))
            alpha = shape_coverage(shape, (cx, cy), diameter, rotation, hw, supersample)
            full = float((alpha >= 0.5).sum())
            if full < 4:
                continue
            # Visible fraction of earlier objects once this one is on top.
            new_visible = visible * (1.0 - alpha)[None]
            ok = True
            for j in range(len(alphas)):
                if (new_visible[j] >= 0.5).sum() < min_visible * max((alphas[j] >= 0.5).sum(), 1):
                    ok = False
                    break
            if ok:
                visible = np.concatenate([new_visible, alpha[None]], axis=0)
                alphas.append(alpha)
                params.append((colour, shape, (cx, cy), diameter, rotation, rgb))
                placed = True
                break
        if not placed:
            continue

    for alpha, (_, _, _, _, _, rgb) in zip(alphas, params, strict=True):
        image = (
            image * (1.0 - alpha[..., None])
            + np.asarray(rgb, dtype=np.float32)[None, None] * alpha[..., None]
        )
    image_u8 = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    masks = visible_masks(visible)
    objects: list[ObjectRecord] = []
    keep = []
    for idx, ((colour, shape, centre, diameter, rotation, rgb), alpha) in enumerate(
        zip(params, alphas, strict=True)
    ):
        m = masks[idx]
        area = int(m.sum())
        if area == 0:
            continue
        ys, xs = np.nonzero(m)
        bbox = (
            int(xs.min()),
            int(ys.min()),
            int(xs.max() - xs.min() + 1),
            int(ys.max() - ys.min() + 1),
        )
        objects.append(
            ObjectRecord(
                colour=colour,
                shape=shape,
                centre=(round(centre[0], 3), round(centre[1], 3)),
                size=round(diameter, 3),
                rotation=round(rotation, 4),
                rgb=rgb,
                bbox=bbox,
                area=area,
                full_area=int((alpha >= 0.5).sum()),
            )
        )
        keep.append(idx)
    return Scene(image=image_u8, masks=masks[keep], objects=objects, background=kind)
