"""Regions that are not objects, drawn from a scene's exact masks, for training region embedders.

End-to-end search ranks every proposal an index holds, and most proposals are not objects:
patches of background and unions of an object with the background around it. An Alpha-CLIP
variant fine-tuned on object masks alone never saw such a mask, so it describes whatever colour
the mask covers; on world v2 colour-matched background and object-plus-background regions fill
70% of its top-10 search results (``benchmarks/results/world_v2_search_diagnosis.md``). These
generators draw both kinds so the fine-tune can learn to score them below every class prompt,
the way a detector's classifier learns a background class.

Masks are ``(K, H, W)`` boolean arrays of the scene's visible objects (exact, from the renderer).
"""

from __future__ import annotations

from functools import partial

import numpy as np

#: A non-object region must cover at least this share of the image (specks teach nothing).
MIN_AREA = 0.02
#: A superset region's IoU with its object stays below this: a miss at search's IoU 0.5.
MAX_SUPERSET_IOU = 0.45


def ellipse(
    rng: np.random.Generator, hw: tuple[int, int], centre: tuple[float, float], radius: float
) -> np.ndarray:
    """A randomly elongated and rotated filled ellipse of mean radius ``radius`` (pixels)."""
    yy, xx = np.mgrid[0 : hw[0], 0 : hw[1]].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    stretch = float(np.exp(rng.uniform(-0.5, 0.5)))
    a, b = radius * stretch, radius / stretch
    dx, dy = xx - centre[0], yy - centre[1]
    u = dx * np.cos(angle) + dy * np.sin(angle)
    v = -dx * np.sin(angle) + dy * np.cos(angle)
    return (u / a) ** 2 + (v / b) ** 2 <= 1.0


def background_region(
    rng: np.random.Generator, objects: np.ndarray, tries: int = 10
) -> np.ndarray | None:
    """A blob of background: a random ellipse minus every object (so it overlaps none).

    ``None`` when no try leaves ``MIN_AREA`` of the image (a scene full of objects).
    """
    hw = objects.shape[1:]
    taken = objects.any(axis=0)
    short = min(hw)
    for _ in range(tries):
        centre = (rng.uniform(0, hw[1]), rng.uniform(0, hw[0]))
        region = ellipse(rng, hw, centre, short * rng.uniform(0.1, 0.4)) & ~taken
        if region.mean() >= MIN_AREA:
            return region
    return None


def superset_region(
    rng: np.random.Generator, objects: np.ndarray, k: int, tries: int = 10
) -> np.ndarray | None:
    """Object ``k`` united with background beside it, so the union's IoU with it is < 0.45.

    The blob never takes pixels of other objects: the region holds one object, too loosely.
    ``None`` when no try grows the region enough (an object filling most of the image).
    """
    hw = objects.shape[1:]
    own = objects[k]
    others = np.delete(objects, k, axis=0).any(axis=0) if len(objects) > 1 else np.zeros_like(own)
    ys, xs = np.nonzero(own)
    if len(ys) == 0:
        return None
    size = max(float(np.sqrt(own.sum())), 2.0)
    for attempt in range(tries):
        direction = rng.uniform(0, 2 * np.pi)
        offset = size * rng.uniform(0.3, 1.0)
        centre = (xs.mean() + offset * np.cos(direction), ys.mean() + offset * np.sin(direction))
        radius = size * rng.uniform(0.9, 1.6) * (1.0 + 0.2 * attempt)
        region = own | (ellipse(rng, hw, centre, radius) & ~others)
        if own.sum() / region.sum() < MAX_SUPERSET_IOU:
            return region
    return None


def negative_region(
    rng: np.random.Generator, objects: np.ndarray, k: int, superset_share: float = 0.5
) -> np.ndarray | None:
    """A superset of object ``k`` (with probability ``superset_share``) or a background blob;
    the other kind when the first cannot be drawn, ``None`` when neither can."""
    superset = partial(superset_region, rng, objects, k)
    background = partial(background_region, rng, objects)
    order = (superset, background) if rng.random() < superset_share else (background, superset)
    return next((r for r in (make() for make in order) if r is not None), None)
