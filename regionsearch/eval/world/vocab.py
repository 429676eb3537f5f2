"""The fixed vocabulary of the synthetic world: 8 shapes x 8 colours = 64 classes.

The vocabulary is small and closed on purpose: a reference CLIP trained from scratch on CPU can
only learn a world it can see many times, and a closed set of classes makes zero-shot accuracy
and referring-expression correctness exactly checkable.
"""

from __future__ import annotations

SHAPES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "diamond",
    "star",
    "cross",
    "ring",
    "hexagon",
)

#: Nominal RGB of each object colour. Rendering adds a small jitter around these.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (35, 65, 225),
    "yellow": (245, 220, 30),
    "purple": (145, 40, 185),
    "orange": (250, 135, 15),
    "white": (248, 248, 248),
    "black": (12, 12, 12),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)

#: Maximum per-channel jitter added to an object colour (keeps colours recognisable).
COLOUR_JITTER = 10

#: Muted mid-tone background colours (greys, browns, dull teals, olive, slate). Each one is far
#: from every object colour (see ``min_object_colour_distance``), so colour alone tells object
#: pixels from background pixels and masks stay checkable.
BACKGROUND_PALETTE: tuple[tuple[int, int, int], ...] = (
    (128, 128, 128),
    (105, 105, 110),
    (150, 148, 145),
    (120, 100, 82),
    (140, 118, 96),
    (96, 84, 72),
    (84, 118, 118),
    (100, 132, 128),
    (112, 116, 92),
    (96, 104, 124),
    (160, 150, 132),
    (132, 112, 120),
)

#: Every background pixel keeps at least this Euclidean RGB distance from every object colour.
BACKGROUND_MIN_DISTANCE = 60.0


def class_names() -> list[str]:
    """All 64 class names ``"{colour} {shape}"`` in a fixed order (category id = index + 1)."""
    return [f"{colour} {shape}" for colour in COLOUR_NAMES for shape in SHAPES]


def class_index(colour: str, shape: str) -> int:
    """0-based index of a class in :func:`class_names` (colour-major)."""
    return COLOUR_NAMES.index(colour) * len(SHAPES) + SHAPES.index(shape)


def min_object_colour_distance(rgb: tuple[float, float, float]) -> float:
    """Smallest Euclidean distance from ``rgb`` to any nominal object colour."""
    return min(
        sum((float(a) - float(b)) ** 2 for a, b in zip(rgb, ref, strict=True)) ** 0.5
        for ref in COLOURS.values()
    )
