"""Shared pieces of the world tests: a strict, independent reader of referring expressions and
the mask erosion / dilation the pixel checks use."""

from __future__ import annotations

import re

import numpy as np
from scipy import ndimage

from regionsearch.eval.world.scene import ObjectRecord
from regionsearch.eval.world.vocab import COLOUR_NAMES, SHAPES


def erode(mask: np.ndarray, steps: int = 1) -> np.ndarray:
    """``mask`` shrunk by ``steps`` pixels (4-connected); pixels outside the image count as set."""
    return ndimage.binary_erosion(mask, iterations=steps, border_value=1)


def dilate(mask: np.ndarray, steps: int = 1) -> np.ndarray:
    """``mask`` grown by ``steps`` pixels (4-connected)."""
    return ndimage.binary_dilation(mask, iterations=steps)


RELATIONS = {
    "left of": lambda a, b: a.centre[0] < b.centre[0],
    "right of": lambda a, b: a.centre[0] > b.centre[0],
    "above": lambda a, b: a.centre[1] < b.centre[1],
    "below": lambda a, b: a.centre[1] > b.centre[1],
}
SUPERLATIVES = {
    "leftmost": lambda o: o.centre[0],
    "rightmost": lambda o: -o.centre[0],
    "topmost": lambda o: o.centre[1],
    "bottommost": lambda o: -o.centre[1],
}
COLOUR_PATTERN = "|".join(COLOUR_NAMES)
SHAPE_PATTERN = "|".join(SHAPES)


def _noun(noun: str, objects: list[ObjectRecord]) -> list[ObjectRecord]:
    """Objects a noun phrase selects: 'red circle', 'circle', 'red object'."""
    words = noun.split()
    if len(words) == 2 and words[1] == "object":
        return [o for o in objects if o.colour == words[0]]
    if len(words) == 2:
        return [o for o in objects if o.colour == words[0] and o.shape == words[1]]
    return [o for o in objects if o.shape == words[0]]


def resolve(expression: str, objects: list[ObjectRecord]) -> list[ObjectRecord]:
    """A strict, independent reading of an expression: every object that satisfies it."""
    noun_re = rf"(?:(?:{COLOUR_PATTERN}) )?(?:{SHAPE_PATTERN})|(?:{COLOUR_PATTERN}) object"
    m = re.fullmatch(rf"the ({noun_re}) (left of|right of|above|below) the ({noun_re})", expression)
    if m:
        landmarks = _noun(m.group(3), objects)
        assert len(landmarks) == 1, f"landmark of {expression!r} is not unique"
        return [o for o in _noun(m.group(1), objects) if RELATIONS[m.group(2)](o, landmarks[0])]
    m = re.fullmatch(rf"the (leftmost|rightmost|topmost|bottommost) ({noun_re})", expression)
    if m:
        group = _noun(m.group(2), objects)
        best = min(SUPERLATIVES[m.group(1)](o) for o in group)
        return [o for o in group if SUPERLATIVES[m.group(1)](o) == best]
    m = re.fullmatch(rf"the (larger|smaller|largest|smallest) ({noun_re})", expression)
    if m:
        group = _noun(m.group(2), objects)
        if m.group(1) in ("larger", "smaller"):
            assert len(group) == 2, expression
        key = max if m.group(1) in ("larger", "largest") else min
        best = key(o.area for o in group)
        return [o for o in group if o.area == best]
    m = re.fullmatch(rf"the ({noun_re})", expression)
    assert m, f"unparsed expression {expression!r}"
    return _noun(m.group(1), objects)
