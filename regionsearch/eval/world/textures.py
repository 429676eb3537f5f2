"""Extra backgrounds and object fills for the domain-randomised world family (``train-dr``).

The reference model trained on the v2 ``train`` family reached 61% single-object zero-shot on
that family but 31% on the held-out one: it learned the few textures it saw, not shapes in front
of *any* texture. These generators widen what training sees so the model has to ignore the
texture kind itself: crossed bands (plaid), colour-quantised fractal noise, dense scribbles,
confetti of small irregular blobs and strips, photo-like smooth colour fields; and fills with
checks, a colour gradient, speckle, or a lattice of small marks (crosses, bars, triangles or
diamonds; ``train-dr2`` only). None of them is Voronoi tiles or dots (the held-out family's): a
lattice of marks of other shapes asks whether invariance to the marks generalises to dots, which
stay unseen. No background draws a vocabulary shape: confetti pieces are irregular polygons
with many jittered vertices or thin strips, never circles, squares, triangles or stars.

Every generator takes ``pick``, a function returning one background colour, so the caller
decides how often object colours appear (this module does not depend on the scene code).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw

Colour = tuple[int, int, int]
Pick = Callable[[], Colour]

#: Background kinds this module renders.
DR_BACKGROUNDS: tuple[str, ...] = ("plaid", "fractal", "scribbles", "confetti", "photo")
#: Object fills this module renders (second-colour share maps, like ``pattern_share``).
DR_PATTERNS: tuple[str, ...] = ("checks", "gradient", "speckle", "marks")
#: Shapes of the ``marks`` fill: never a disc (the held-out family's dots).
MARK_SHAPES: tuple[str, ...] = ("cross", "bar", "triangle", "diamond")


def _grid(hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0 : hw[0], 0 : hw[1]].astype(np.float32)
    return xx, yy


def _smooth_field(rng: np.random.Generator, hw: tuple[int, int], cells: int) -> np.ndarray:
    """A zero-mean smooth random field: ``cells`` x ``cells`` normals upsampled bicubically."""
    coarse = rng.normal(size=(cells + 1, cells + 1)).astype(np.float32)
    img = Image.fromarray(coarse, mode="F").resize((hw[1], hw[0]), Image.Resampling.BICUBIC)
    return np.asarray(img)


def plaid(rng: np.random.Generator, hw: tuple[int, int], pick: Pick) -> np.ndarray:
    """Two families of semi-transparent bands crossing at a non-right angle (tartan-like).

    Periods differ by at least 1.4x and bands cover under half a period, so crossings are small
    parallelograms of a blended colour, never a grid of object-coloured squares.
    """
    xx, yy = _grid(hw)
    base = np.asarray(pick(), np.float32)
    out = np.broadcast_to(base, (*hw, 3)).astype(np.float32)
    a1 = rng.uniform(0, math.pi)
    a2 = a1 + rng.uniform(0.3, 0.8) * math.pi / 2 * (1 if rng.random() < 0.5 else -1) + math.pi / 2
    p1 = rng.uniform(0.06, 0.2) * min(hw)
    for angle, period in ((a1, p1), (a2, p1 * rng.uniform(1.4, 2.2))):
        t = xx * math.cos(angle) + yy * math.sin(angle)
        duty = rng.uniform(0.1, 0.3)
        band = (np.mod(t, period) < duty * period)[..., None]
        colour = np.asarray(pick(), np.float32)
        alpha = rng.uniform(0.5, 0.9)
        out = np.where(band, out * (1 - alpha) + colour * alpha, out)
    return out


def fractal(rng: np.random.Generator, hw: tuple[int, int], pick: Pick) -> np.ndarray:
    """Multi-octave noise quantised into three to five colours: ragged regions, sharp edges."""
    field = np.zeros(hw, np.float32)
    cells = int(rng.integers(2, 5))
    amp = 1.0
    for _ in range(4):
        field += amp * _smooth_field(rng, hw, min(cells, max(hw)))
        cells *= 2
        amp *= float(rng.uniform(0.45, 0.65))
    k = int(rng.integers(3, 6))
    levels = np.quantile(field, np.sort(rng.uniform(0.1, 0.9, size=k - 1)))
    colours = np.asarray([pick() for _ in range(k)], np.float32)
    return colours[np.digitize(field, levels)]


def scribbles(rng: np.random.Generator, hw: tuple[int, int], pick: Pick) -> np.ndarray:
    """Dense random-walk pen strokes of varying width over a flat ground."""
    height, width = hw
    canvas = Image.new("RGB", (width, height), pick())
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(12, 40))):
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        heading = rng.uniform(0, 2 * math.pi)
        step = rng.uniform(0.03, 0.08) * min(hw)
        points = [(float(x), float(y))]
        for _ in range(int(rng.integers(4, 14))):
            heading += rng.normal(0, 0.9)
            x, y = x + step * math.cos(heading), y + step * math.sin(heading)
            points.append((float(x), float(y)))
        stroke = max(1, int(rng.uniform(0.006, 0.03) * min(hw)))
        draw.line(points, fill=pick(), width=stroke, joint="curve")
    return np.asarray(canvas, dtype=np.float32)


def _irregular_polygon(
    rng: np.random.Generator, cx: float, cy: float, r: float
) -> list[tuple[float, float]]:
    """9-14 vertices at jittered angles and radii 0.35-1.0 r: a blob no shape name fits."""
    n = int(rng.integers(9, 15))
    angles = np.sort(rng.uniform(0, 2 * math.pi, size=n))
    radii = r * rng.uniform(0.35, 1.0, size=n)
    return [
        (float(cx + q * math.cos(a)), float(cy + q * math.sin(a)))
        for a, q in zip(angles, radii, strict=True)
    ]


def confetti(rng: np.random.Generator, hw: tuple[int, int], pick: Pick) -> np.ndarray:
    """Many small irregular blobs and thin strips (1.5-5% of the short side) in mixed colours."""
    height, width = hw
    canvas = Image.new("RGB", (width, height), pick())
    draw = ImageDraw.Draw(canvas)
    density = rng.uniform(0.5, 2.0)
    for _ in range(int(density * height * width / (0.05 * min(hw)) ** 2 / 4)):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        r = rng.uniform(0.015, 0.05) * min(hw)
        if rng.random() < 0.6:
            draw.polygon(_irregular_polygon(rng, cx, cy, r), fill=pick())
        else:
            a = rng.uniform(0, math.pi)
            dx, dy = r * math.cos(a), r * math.sin(a)
            draw.line(
                [(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=pick(), width=max(1, int(r / 3.5))
            )
    return np.asarray(canvas, dtype=np.float32)


def photo(rng: np.random.Generator, hw: tuple[int, int], pick: Pick) -> np.ndarray:
    """A photo-like smooth colour field: blended colour gradients, light falloff and grain."""
    xx, yy = _grid(hw)
    k = int(rng.integers(2, 5))
    weights = np.stack(
        [np.exp(1.5 * _smooth_field(rng, hw, int(rng.integers(1, 4)))) for _ in range(k)]
    )
    weights /= weights.sum(axis=0, keepdims=True)
    colours = np.asarray([pick() for _ in range(k)], np.float32)
    out = np.einsum("khw,kc->hwc", weights, colours)
    cx, cy = rng.uniform(0, hw[1]), rng.uniform(0, hw[0])
    dist = np.hypot(xx - cx, yy - cy) / max(hw)
    light = 1.0 + rng.uniform(-0.35, 0.2) * dist
    out = out * light[..., None] + rng.normal(0, rng.uniform(0, 6), size=(*hw, 1))
    return np.clip(out, 0, 255).astype(np.float32)


_BACKGROUNDS: dict[str, Callable[[np.random.Generator, tuple[int, int], Pick], np.ndarray]] = {
    "plaid": plaid,
    "fractal": fractal,
    "scribbles": scribbles,
    "confetti": confetti,
    "photo": photo,
}


def render_dr_background(
    rng: np.random.Generator, hw: tuple[int, int], kind: str, pick: Pick
) -> np.ndarray:
    """A float32 (H, W, 3) background of one of :data:`DR_BACKGROUNDS`."""
    if kind not in _BACKGROUNDS:
        raise ValueError(f"unknown background kind {kind!r}; choose one of {DR_BACKGROUNDS}")
    return _BACKGROUNDS[kind](rng, hw, pick).astype(np.float32)


def dr_pattern_share(
    rng: np.random.Generator,
    pattern: str,
    u: np.ndarray,
    v: np.ndarray,
    r: float,
) -> np.ndarray:
    """Second-colour share in [0, 1] for a fill of :data:`DR_PATTERNS`.

    ``u``, ``v`` are pixel offsets from the object's centre and ``r`` its radius. As for the
    v2 fills, the second colour keeps to about a third of the object or less, so the named
    colour stays the majority.
    """
    angle = rng.uniform(0, 2 * math.pi)
    t = u * math.cos(angle) + v * math.sin(angle)
    if pattern == "checks":
        # One cell in four: a quarter of the object, aligned with a random axis.
        period = max(3.0, rng.uniform(0.35, 0.6) * r)
        s = -u * math.sin(angle) + v * math.cos(angle)
        return ((np.mod(t, 2 * period) < period) & (np.mod(s, 2 * period) < period)).astype(
            np.float32
        )
    if pattern == "gradient":
        # A soft blend towards the second colour on one side (at most 60% mixed, mean ~a quarter).
        peak = rng.uniform(0.4, 0.6)
        return (np.clip((t / max(r, 1e-6) + 1) / 2, 0, 1) ** 1.5 * peak).astype(np.float32)
    if pattern == "speckle":
        density = rng.uniform(0.12, 0.3)
        return (rng.random(u.shape) < density).astype(np.float32)
    if pattern == "marks":
        s = -u * math.sin(angle) + v * math.cos(angle)
        return _marks(rng, t, s, r)
    raise ValueError(f"unknown pattern {pattern!r}; choose one of {DR_PATTERNS}")


def _marks(rng: np.random.Generator, t: np.ndarray, s: np.ndarray, r: float) -> np.ndarray:
    """A jittered lattice of one small mark shape (8-15% of the object, never discs).

    ``t``, ``s`` are the lattice axes in pixels; each cell's mark is shifted by up to a tenth
    of the period, so the lattice is not perfectly regular.
    """
    period = max(3.0, rng.uniform(0.4, 0.65) * r)
    size = rng.uniform(0.26, 0.34) * period  # the mark's half-extent
    col, row = np.floor(t / period).astype(np.int64), np.floor(s / period).astype(np.int64)
    jitter = rng.uniform(-0.1, 0.1, size=(2, 7, 5)) * period
    du = np.mod(t, period) - period / 2 - jitter[0][col % 7, row % 5]
    dv = np.mod(s, period) - period / 2 - jitter[1][col % 7, row % 5]
    kind = MARK_SHAPES[int(rng.integers(len(MARK_SHAPES)))]
    if kind == "cross":
        arm = size / 3
        inside = ((np.abs(du) < size) & (np.abs(dv) < arm)) | (
            (np.abs(dv) < size) & (np.abs(du) < arm)
        )
    elif kind == "bar":
        inside = (np.abs(du) < size) & (np.abs(dv) < size / 3)
    elif kind == "triangle":
        # Inside all three edges of an equilateral triangle of circumradius ``size``.
        inside = np.ones(du.shape, dtype=bool)
        for k in range(3):
            a = -math.pi / 2 + 2 * math.pi * k / 3
            inside &= du * math.cos(a) + dv * math.sin(a) < size / 2
    else:  # diamond
        inside = np.abs(du) + np.abs(dv) < size
    return inside.astype(np.float32)


def occlude(
    rng: np.random.Generator, image: np.ndarray, visible: np.ndarray, pick: Pick
) -> tuple[np.ndarray, np.ndarray]:
    """One to three opaque strokes over a finished scene; visible coverages lose what they hide.

    ``image`` is float (H, W, 3), ``visible`` the (K, H, W) coverages of its objects.

    Strokes (not shapes) keep the rule that every vocabulary shape in an image is annotated.
    """
    height, width = image.shape[:2]
    layer = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(layer)
    colour_layer = Image.new("RGB", (width, height), (0, 0, 0))
    colour_draw = ImageDraw.Draw(colour_layer)
    for _ in range(int(rng.integers(1, 4))):
        points = [
            (float(rng.uniform(0, width)), float(rng.uniform(0, height)))
            for _ in range(int(rng.integers(2, 4)))
        ]
        stroke = max(1, int(rng.uniform(0.015, 0.05) * min(height, width)))
        draw.line(points, fill=255, width=stroke)
        colour_draw.line(points, fill=pick(), width=stroke)
    cover = np.asarray(layer, dtype=np.float32)[..., None] / 255.0
    image = image * (1.0 - cover) + np.asarray(colour_layer, dtype=np.float32) * cover
    return image, visible * (1.0 - cover[..., 0])[None]
