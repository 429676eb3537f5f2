"""World v2: scenes where colour alone does not isolate an object.

In the first world every object had a flat colour on a muted background, so a colour direction
was enough to find an object and neither a model nor a region embedder ever had to localise a
*shape*. Version 2 removes that shortcut while keeping masks exact (they come from the geometry,
never from pixel colours):

- several objects of one colour and different shapes in the same scene;
- two-tone, striped and dotted objects (the named colour always covers most of the object);
- textured backgrounds (stripes, strokes, waves, blobs, irregular tiles) that may use object
  colours, next to the muted ones of version 1 (none of them draws a vocabulary shape);
- non-square canvases, free rotation, objects from ~6% of the short side, heavier occlusion,
  and blur, noise and JPEG applied to the finished image.

Renderings are grouped in *families*. ``train`` is what the reference model v2 was first
trained on; ``heldout`` uses a background family (irregular tiles), a pattern (dots) and a canvas
aspect range that ``train`` never renders, so validating on it measures generalisation to unseen
renderings. ``train-dr`` is domain randomisation for that: ``train`` plus the textures and fills
of :mod:`~regionsearch.eval.world.textures`, canvases up to 2.6:1 (squashed to the model's
square input), stronger degradations and occluding strokes, still without tiles or dots;
``train-dr2`` adds a lattice-of-marks fill (no discs).
"""

from __future__ import annotations

import dataclasses
import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from regionsearch.eval.world.scene import (
    ObjectRecord,
    Scene,
    _jittered_rgb,
    render_background,
    shape_coverage,
    visible_masks,
)
from regionsearch.eval.world.textures import (
    DR_BACKGROUNDS,
    DR_PATTERNS,
    dr_pattern_share,
    occlude,
    render_dr_background,
)
from regionsearch.eval.world.vocab import BACKGROUND_PALETTE, COLOUR_NAMES, COLOURS, SHAPES

#: Background kinds of version 2 (the first four are version 1's muted ones).
BACKGROUNDS_V2: tuple[str, ...] = (
    "flat",
    "gradient",
    "noise",
    "clutter",
    "stripes",
    "strokes",
    "tiles",
    "waves",
    "blobs",
    *DR_BACKGROUNDS,
)
#: Object fills: ``flat`` is one colour; the others add a second object colour on a minority.
PATTERNS: tuple[str, ...] = ("flat", "two-tone", "stripes", "dots", *DR_PATTERNS)
#: Shapes whose rotation is limited so a square never reads as a diamond (nor back).
_LIMITED_ROTATION = {"square": math.radians(20), "diamond": math.radians(20)}


@dataclass(frozen=True)
class Family:
    """A distribution of renderings.

    ``aspect`` bounds the long/short side ratio of the canvas (orientation is random);
    ``size_range`` is the object diameter as a fraction of the short side (drawn log-uniform);
    ``pattern_weights`` pairs with ``patterns``; ``same_colour_prob`` is the chance that a scene
    with free classes gives one colour to several objects of different shapes.
    ``degrade_strength`` scales blur and noise and lowers JPEG quality; ``occluder_prob`` is the
    chance of one to three opaque strokes drawn over the objects (masks lose what they cover);
    ``object_colour_share`` is how often a textured background takes an object colour.
    """

    name: str
    backgrounds: tuple[str, ...]
    patterns: tuple[str, ...]
    pattern_weights: tuple[float, ...]
    aspect: tuple[float, float]
    size_range: tuple[float, float]
    min_visible: float
    same_colour_prob: float
    degrade_prob: float
    degrade_strength: float = 1.0
    occluder_prob: float = 0.0
    object_colour_share: float = 0.5


#: The ``train`` family's backgrounds: every v2 kind but the held-out ``tiles`` and the
#: domain-randomised textures (``train-dr`` adds those), in ``BACKGROUNDS_V2`` order.
TRAIN_BACKGROUNDS: tuple[str, ...] = tuple(
    b for b in BACKGROUNDS_V2 if b != "tiles" and b not in DR_BACKGROUNDS
)

FAMILIES: dict[str, Family] = {
    "train": Family(
        name="train",
        backgrounds=TRAIN_BACKGROUNDS,
        patterns=("flat", "two-tone", "stripes"),
        pattern_weights=(0.5, 0.25, 0.25),
        aspect=(1.0, 1.6),
        size_range=(0.06, 0.6),
        min_visible=0.5,
        same_colour_prob=0.5,
        degrade_prob=0.3,
    ),
    "heldout": Family(
        name="heldout",
        backgrounds=("tiles",),
        patterns=("flat", "dots"),
        pattern_weights=(0.5, 0.5),
        aspect=(1.7, 2.0),
        size_range=(0.08, 0.5),
        min_visible=0.5,
        same_colour_prob=0.5,
        degrade_prob=0.3,
    ),
    "train-dr": Family(
        name="train-dr",
        backgrounds=(
            *TRAIN_BACKGROUNDS,
            *DR_BACKGROUNDS,
            *DR_BACKGROUNDS,  # twice: object-coloured textures are the hard, common case
        ),
        patterns=("flat", "two-tone", "stripes", "checks", "gradient", "speckle"),
        pattern_weights=(0.4, 0.12, 0.12, 0.12, 0.12, 0.12),
        aspect=(1.0, 2.6),
        size_range=(0.06, 0.6),
        min_visible=0.4,
        same_colour_prob=0.5,
        degrade_prob=0.4,
        degrade_strength=1.6,
        occluder_prob=0.25,
        object_colour_share=0.6,
    ),
}
#: ``train-dr`` plus a lattice-of-marks fill (crosses, bars, triangles, diamonds), which shares
#: the held-out dots' structure without their disc shape: does invariance to marks carry over?
FAMILIES["train-dr2"] = dataclasses.replace(
    FAMILIES["train-dr"],
    name="train-dr2",
    patterns=(*FAMILIES["train-dr"].patterns, "marks"),
    pattern_weights=(0.34, 0.11, 0.11, 0.11, 0.11, 0.11, 0.11),
)
#: ``train-dr2`` with flat fills rare (10%, not 34%): v8 names only 66.5% of its own family's
#: checked objects against 78.5% overall (benchmarks/results/marks_fill_pilot.md), so patterned
#: objects are underfit; this family spends the steps on them. Prepared for a GPU phase.
_N_DR2_PATTERNED = len(FAMILIES["train-dr2"].patterns) - 1  # all but "flat", listed first
FAMILIES["train-drp"] = dataclasses.replace(
    FAMILIES["train-dr2"],
    name="train-drp",
    pattern_weights=(0.1, *(0.9 / _N_DR2_PATTERNED,) * _N_DR2_PATTERNED),
)


def get_family(name: str) -> Family:
    """The family called ``name``, or a clear error listing the known ones."""
    if name not in FAMILIES:
        raise ValueError(f"unknown world family {name!r}; choose one of {sorted(FAMILIES)}")
    return FAMILIES[name]


def _object_rgb_array() -> np.ndarray:
    return np.asarray(list(COLOURS.values()), dtype=np.float32)


def _mixed_colour(rng: np.random.Generator, object_share: float) -> tuple[int, int, int]:
    """A background colour: an object colour with probability ``object_share``, else muted."""
    if rng.random() < object_share:
        rgb = _object_rgb_array()[rng.integers(len(COLOURS))]
    else:
        rgb = np.asarray(BACKGROUND_PALETTE[rng.integers(len(BACKGROUND_PALETTE))], np.float32)
    return (int(rgb[0]), int(rgb[1]), int(rgb[2]))


def render_background_v2(
    rng: np.random.Generator, hw: tuple[int, int], kind: str, object_share: float = 0.5
) -> np.ndarray:
    """A float32 (H, W, 3) background; the textured kinds may use object colours.

    None of them draws a vocabulary shape, so every circle, star or cross in an image is an
    annotated object; but a red stripe may run right behind a red star. ``object_share`` is the
    chance that a colour of a :mod:`~regionsearch.eval.world.textures` kind is an object colour.
    """
    height, width = hw
    if kind in ("flat", "gradient", "noise", "clutter"):
        return render_background(rng, hw, kind)
    if kind in DR_BACKGROUNDS:
        return render_dr_background(rng, hw, kind, lambda: _mixed_colour(rng, object_share))
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    if kind == "stripes":
        angle = rng.uniform(0, math.pi)
        period = rng.uniform(0.08, 0.3) * min(hw)
        colours = np.asarray([_mixed_colour(rng, 0.5) for _ in range(int(rng.integers(2, 4)))])
        t = xx * math.cos(angle) + yy * math.sin(angle)
        band = np.floor(t / period).astype(np.int64) % len(colours)
        return colours[band].astype(np.float32)
    if kind == "strokes":
        canvas = Image.new("RGB", (width, height), _mixed_colour(rng, 0.15))
        draw = ImageDraw.Draw(canvas)
        for _ in range(int(rng.integers(3, 9))):
            points = [
                (float(rng.uniform(0, width)), float(rng.uniform(0, height)))
                for _ in range(int(rng.integers(2, 4)))
            ]
            stroke = max(1, int(rng.uniform(0.01, 0.05) * min(hw)))
            draw.line(points, fill=_mixed_colour(rng, 0.6), width=stroke)
        return np.asarray(canvas, dtype=np.float32)
    if kind == "tiles":
        return _irregular_tiles(rng, hw, xx, yy)
    if kind == "waves":
        # Curved bands: like stripes, but their edges bend, so no straight-edge cue survives.
        angle = rng.uniform(0, math.pi)
        period = rng.uniform(0.1, 0.3) * min(hw)
        amp, wavelength = rng.uniform(0.05, 0.2) * min(hw), rng.uniform(0.3, 1.0) * min(hw)
        colours = np.asarray([_mixed_colour(rng, 0.5) for _ in range(int(rng.integers(2, 4)))])
        c, s = math.cos(angle), math.sin(angle)
        t = xx * c + yy * s + amp * np.sin(2 * math.pi * (-xx * s + yy * c) / wavelength)
        band = np.floor(t / period).astype(np.int64) % len(colours)
        return colours[band].astype(np.float32)
    if kind == "blobs":
        # Smooth blotches of two or three colours (a thresholded low-frequency field).
        k = int(rng.integers(2, 4))
        cells = max(2, round(min(hw) / (rng.uniform(0.15, 0.4) * min(hw))))
        coarse = rng.normal(size=(cells + 1, cells + 1)).astype(np.float32)
        field = np.asarray(
            Image.fromarray(coarse, mode="F").resize((width, height), Image.Resampling.BICUBIC)
        )
        levels = np.quantile(field, np.linspace(0, 1, k + 1)[1:-1])
        colours = np.asarray([_mixed_colour(rng, 0.5) for _ in range(k)])
        return colours[np.digitize(field, levels)].astype(np.float32)
    raise ValueError(f"unknown background kind {kind!r}; choose one of {BACKGROUNDS_V2}")


def _irregular_tiles(
    rng: np.random.Generator, hw: tuple[int, int], xx: np.ndarray, yy: np.ndarray
) -> np.ndarray:
    """Irregular (Voronoi) tiles in two to four colours, object colours among them.

    Tiles were once a square checkerboard, which painted rows of red, black or white *squares*
    (vocabulary classes) behind every held-out object: the image then showed dozens of
    unannotated squares and the label named something else. Irregular cells keep an
    object-coloured, high-contrast texture that training never sees without drawing a shape of
    the vocabulary.
    """
    height, width = hw
    cell = max(4.0, float(rng.uniform(0.07, 0.22)) * min(hw))
    n = max(4, round(height * width / (cell * cell)))
    seeds = rng.uniform(0, 1, size=(n, 2)) * np.asarray([width, height], dtype=np.float64)
    colours = np.asarray([_mixed_colour(rng, 0.3) for _ in range(int(rng.integers(2, 5)))])
    of_seed = rng.integers(len(colours), size=n)
    points = np.stack([xx.ravel() + 0.5, yy.ravel() + 0.5], axis=1)
    # Nearest seed by |p - s|^2 = |p|^2 - 2 p.s + |s|^2, where |p|^2 does not change the argmin.
    seeds32 = seeds.astype(np.float32)
    bias = (seeds32 * seeds32).sum(axis=1)[None]
    nearest = np.concatenate(
        [
            (bias - 2.0 * chunk @ seeds32.T).argmin(axis=1)
            for chunk in np.array_split(points, max(1, len(points) * n // 4_000_000))
        ]
    ).reshape(height, width)
    return colours[of_seed[nearest]].astype(np.float32)


def pattern_share(
    rng: np.random.Generator,
    pattern: str,
    centre: tuple[float, float],
    size: float,
    hw: tuple[int, int],
) -> np.ndarray | None:
    """Where (float 0/1, ``hw``) the second colour of a patterned object goes; ``None`` if flat.

    Every pattern keeps the second colour to roughly a third of the object or less, so the
    object's named colour stays its majority colour.
    """
    if pattern == "flat":
        return None
    height, width = hw
    r = size / 2.0
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = xx + 0.5 - centre[0], yy + 0.5 - centre[1]
    if pattern in DR_PATTERNS:
        return dr_pattern_share(rng, pattern, u, v, r)
    angle = rng.uniform(0, 2 * math.pi)
    t = u * math.cos(angle) + v * math.sin(angle)
    if pattern == "two-tone":
        return (t > rng.uniform(0.3, 0.45) * r).astype(np.float32)
    if pattern == "stripes":
        period = max(2.5, rng.uniform(0.35, 0.55) * r)
        return (np.sin(2 * math.pi * t / period) > 0.5).astype(np.float32)
    if pattern == "dots":
        period = max(3.0, rng.uniform(0.4, 0.6) * r)
        s = -u * math.sin(angle) + v * math.cos(angle)
        du = np.mod(t, period) - period / 2
        dv = np.mod(s, period) - period / 2
        return (du * du + dv * dv < (0.3 * period) ** 2).astype(np.float32)
    raise ValueError(f"unknown pattern {pattern!r}; choose one of {PATTERNS}")


def degrade(
    rng: np.random.Generator, image: np.ndarray, prob: float, strength: float = 1.0
) -> np.ndarray:
    """Blur, sensor noise and JPEG, each applied with probability ``prob`` (masks unaffected).

    ``strength`` scales the blur radius and noise level and divides the JPEG quality; the
    random draws do not depend on it, so ``strength=1`` renders exactly what it always did.
    """
    out = Image.fromarray(image)
    if rng.random() < prob:
        radius = float(rng.uniform(0.3, 1.0)) * strength
        out = out.filter(ImageFilter.GaussianBlur(radius=radius))
    arr = np.asarray(out, dtype=np.float32)
    if rng.random() < prob:
        arr = arr + rng.normal(0.0, rng.uniform(2.0, 8.0) * strength, size=arr.shape)
    arr_u8 = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    if rng.random() < prob:
        buf = io.BytesIO()
        quality = max(10, round(int(rng.integers(35, 91)) / strength))
        Image.fromarray(arr_u8).save(buf, format="JPEG", quality=quality)
        arr_u8 = np.asarray(Image.open(buf).convert("RGB"))
    return arr_u8


def canvas_hw(rng: np.random.Generator, short_side: int, aspect: tuple[float, float]) -> tuple:
    """(H, W) with the short side fixed and a random long/short ratio and orientation."""
    ratio = float(np.exp(rng.uniform(math.log(aspect[0]), math.log(aspect[1]))))
    long_side = round(short_side * ratio)
    return (short_side, long_side) if rng.random() < 0.5 else (long_side, short_side)


def free_classes(rng: np.random.Generator, n: int, same_colour_prob: float) -> list[tuple]:
    """``n`` random (colour, shape) pairs; with ``same_colour_prob`` at least two share a colour.

    Objects sharing a colour get different shapes, so only shape tells them apart.
    """
    classes = [
        (COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))], SHAPES[int(rng.integers(len(SHAPES)))])
        for _ in range(n)
    ]
    if n >= 2 and rng.random() < same_colour_prob:
        k = int(rng.integers(2, n + 1))
        colour = COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))]
        shapes = rng.choice(len(SHAPES), size=k, replace=False)
        for i, s in zip(rng.permutation(n)[:k], shapes, strict=True):
            classes[int(i)] = (colour, SHAPES[int(s)])
    return classes


def _rotation(rng: np.random.Generator, shape: str) -> float:
    limit = _LIMITED_ROTATION.get(shape)
    if limit is None:
        return float(rng.uniform(0, 2 * math.pi))
    return float(rng.uniform(-limit, limit))


def render_scene_v2(
    rng: np.random.Generator,
    family: Family | str = "train",
    short_side: int = 224,
    n_objects: int | None = None,
    min_objects: int = 1,
    max_objects: int = 6,
    classes: list[tuple[str, str]] | None = None,
    size_range: tuple[float, float] | None = None,
    supersample: int = 4,
) -> Scene:
    """Render one version-2 scene of ``family``; masks are exact and never overlap.

    As in version 1, an object's mask is where its visible coverage is at least one half, and
    every object keeps ``family.min_visible`` of its area (placements that break it are retried
    smaller; an object that still cannot be placed is dropped).
    """
    fam = get_family(family) if isinstance(family, str) else family
    hw = canvas_hw(rng, short_side, fam.aspect)
    height, width = hw
    if classes is None:
        n = n_objects if n_objects is not None else int(rng.integers(min_objects, max_objects + 1))
        classes = free_classes(rng, n, fam.same_colour_prob)
    kind = fam.backgrounds[int(rng.integers(len(fam.backgrounds)))]
    image = render_background_v2(rng, hw, kind, fam.object_colour_share)
    lo, hi = size_range or fam.size_range
    hi_n = max(lo, min(hi, 0.95 / math.sqrt(max(len(classes), 1))))
    weights = np.asarray(fam.pattern_weights, dtype=np.float64)
    placed: list[dict] = []
    visible = np.zeros((0, height, width), dtype=np.float32)
    for colour, shape in classes:
        pattern = fam.patterns[int(rng.choice(len(fam.patterns), p=weights / weights.sum()))]
        rgb = _jittered_rgb(rng, colour)
        secondary_name = COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))]
        while secondary_name == colour:
            secondary_name = COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))]
        rotation = _rotation(rng, shape)
        for attempt in range(40):
            shrink = 1.0 - 0.5 * attempt / 40
            diameter = float(np.exp(rng.uniform(math.log(lo), math.log(hi_n)))) * min(hw) * shrink
            r = diameter / 2
            cx = float(rng.uniform(r, max(r, width - r)))
            cy = float(rng.uniform(r, max(r, height - r)))
            alpha = shape_coverage(shape, (cx, cy), diameter, rotation, hw, supersample)
            if float((alpha >= 0.5).sum()) < 4:
                continue
            new_visible = visible * (1.0 - alpha)[None]
            if all(
                (new_visible[j] >= 0.5).sum() >= fam.min_visible * max(p["full"], 1)
                for j, p in enumerate(placed)
            ):
                visible = np.concatenate([new_visible, alpha[None]], axis=0)
                share = pattern_share(rng, pattern, (cx, cy), diameter, hw)
                placed.append(
                    {
                        "colour": colour,
                        "shape": shape,
                        "centre": (cx, cy),
                        "size": diameter,
                        "rotation": rotation,
                        "rgb": rgb,
                        "alpha": alpha,
                        "full": int((alpha >= 0.5).sum()),
                        "pattern": pattern,
                        "share": share,
                        "secondary": _jittered_rgb(rng, secondary_name),
                        "secondary_colour": secondary_name,
                    }
                )
                break

    for p in placed:
        fill = np.asarray(p["rgb"], dtype=np.float32)[None, None]
        if p["share"] is not None:
            second = np.asarray(p["secondary"], dtype=np.float32)[None, None]
            fill = fill * (1.0 - p["share"][..., None]) + second * p["share"][..., None]
        a = p["alpha"][..., None]
        image = image * (1.0 - a) + fill * a
    if placed and fam.occluder_prob > 0 and rng.random() < fam.occluder_prob:
        image, visible = occlude(rng, image, visible, lambda: _mixed_colour(rng, 0.5))
    image_u8 = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    image_u8 = degrade(rng, image_u8, fam.degrade_prob, fam.degrade_strength)
    masks = visible_masks(visible)
    objects: list[ObjectRecord] = []
    keep = []
    for idx, p in enumerate(placed):
        m = masks[idx]
        area = int(m.sum())
        if area == 0:
            continue
        ys, xs = np.nonzero(m)
        objects.append(
            ObjectRecord(
                colour=p["colour"],
                shape=p["shape"],
                centre=(round(p["centre"][0], 3), round(p["centre"][1], 3)),
                size=round(p["size"], 3),
                rotation=round(p["rotation"], 4),
                rgb=p["rgb"],
                bbox=(
                    int(xs.min()),
                    int(ys.min()),
                    int(xs.max() - xs.min() + 1),
                    int(ys.max() - ys.min() + 1),
                ),
                area=area,
                full_area=p["full"],
                pattern=p["pattern"],
                secondary_colour=p["secondary_colour"] if p["share"] is not None else None,
                secondary_rgb=p["secondary"] if p["share"] is not None else None,
            )
        )
        keep.append(idx)
    return Scene(image=image_u8, masks=masks[keep], objects=objects, background=kind)
