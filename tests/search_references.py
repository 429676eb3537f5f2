"""Slow, pair-by-pair references for the search result switches, shared by their tests."""

from __future__ import annotations

import numpy as np

from regionsearch.search.postprocess import REPETITION_DISJOINT


def random_rectangles(
    rng: np.random.Generator,
    n: int,
    size: int = 24,
    *,
    corner_margin: int = 4,
    sides: tuple[int, int] | None = None,
) -> np.ndarray:
    """``n`` random rectangles on a ``size`` x ``size`` canvas: a corner in
    ``[0, size - corner_margin)``, sides in ``sides`` (default ``[3, size // 2)``), clipped."""
    low, high = sides or (3, size // 2)
    masks = np.zeros((n, size, size), bool)
    for m in masks:
        y, x = rng.integers(0, size - corner_margin, 2)
        h, w = rng.integers(low, high, 2)
        m[y : y + h, x : x + w] = True
    return masks


def brute_force_supersets(image_of, scores, masks, margin: float, cover: float) -> list[bool]:
    """Region i goes when a smaller region j of its image, ``cover`` of it inside i, scores at
    least ``scores[i] - margin`` (pixel counts, pair by pair)."""
    out = []
    for i, mi in enumerate(masks):
        out.append(
            any(
                j != i
                and image_of[j] == image_of[i]
                and mj.sum() < mi.sum()
                and (mi & mj).sum() >= cover * mj.sum()
                and scores[j] >= scores[i] - margin
                for j, mj in enumerate(masks)
            )
        )
    return out


def brute_force_repetition(
    image_of: np.ndarray, vectors: np.ndarray, masks: np.ndarray, neighbours: int
) -> np.ndarray:
    """Pixel counts, pair by pair: the mean of the ``neighbours`` highest cosines to regions of
    the same image that neither hold more than REPETITION_DISJOINT of the other (missing: -1)."""
    out = []
    for i, mi in enumerate(masks):
        sims = sorted(
            (
                float(vectors[i] @ vectors[j])
                for j, mj in enumerate(masks)
                if j != i
                and image_of[j] == image_of[i]
                and (mi & mj).sum() <= REPETITION_DISJOINT * mi.sum()
                and (mi & mj).sum() <= REPETITION_DISJOINT * mj.sum()
            ),
            reverse=True,
        )
        out.append(np.mean((sims + [-1.0] * neighbours)[:neighbours]))
    return np.asarray(out)
