"""The repeated-stuff result switch: a region that looks like several other regions of its image
that it barely touches loses score (the searcher's exactness with it on is checked in
``test_search_quality``)."""

from __future__ import annotations

import numpy as np
import pytest
from search_references import brute_force_repetition, random_rectangles

from regionsearch.eval.search_collection import RegionSet
from regionsearch.eval.search_task import rank
from regionsearch.masks import rle as rle_mod
from regionsearch.search.postprocess import (
    ResultOptions,
    mask_cover,
    repetition_penalty,
    repetition_scores,
)


def _random_regions(rng: np.random.Generator, n: int, size: int = 32) -> np.ndarray:
    """Smaller rectangles than the other switch tests use: more of them stay disjoint."""
    return random_rectangles(rng, n, size, corner_margin=3, sides=(2, size // 3))


def _unit(rng: np.random.Generator, n: int, d: int = 8) -> np.ndarray:
    v = rng.normal(size=(n, d))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def test_repetition_scores_equal_brute_force() -> None:
    rng = np.random.default_rng(11)
    masks = _random_regions(rng, 25)
    vectors = _unit(rng, 25)
    vectors[5:9] = vectors[4]  # look-alikes (some of them overlap, then they do not count)
    cover = mask_cover(rle_mod.encode_many(masks))
    for neighbours in (1, 2, 3, 30):
        expected = brute_force_repetition(np.zeros(25), vectors, masks, neighbours)
        got = repetition_scores(vectors, cover, neighbours)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert repetition_scores(vectors[:1], cover[:1, :1], 3).tolist() == [-1.0]  # alone


def test_repeated_tiles_lose_to_a_distinct_object() -> None:
    """Five alike background tiles and one object, each apart from the others: the tiles score
    higher for the query but lose ``w * (1 - floor)``; the object keeps its score and wins."""
    masks = np.zeros((6, 30, 30), bool)
    for i in range(5):
        masks[i, i * 6 : i * 6 + 5, :10] = True  # a column of tiles
    masks[5, 10:20, 15:25] = True  # the object
    tile, thing = np.eye(4, dtype=np.float32)[:2]
    vectors = np.stack([tile] * 5 + [thing])
    rles = rle_mod.encode_many(masks)
    options = ResultOptions(repetition=0.5, dedupe_iou=None, superset_margin=None)
    repetition = repetition_scores(vectors, mask_cover(rles), options.repetition_neighbours)
    np.testing.assert_allclose(repetition, [1, 1, 1, 1, 1, 0])
    penalty = repetition_penalty(repetition, options)
    np.testing.assert_allclose(penalty, [-0.125] * 5 + [0.0])
    regions = RegionSet(
        "t",
        [rles],
        np.zeros(6, np.int64),
        masks.reshape(6, -1).mean(1),
        np.zeros((6, 1)),
        np.zeros((6, 1), np.int64),
        [rle_mod.iou_matrix(rles, rles)],
        np.arange(6),
    )
    np.testing.assert_allclose(regions.repetition(vectors, 3), repetition, atol=1e-6)
    scores = np.array([0.3] * 5 + [0.25])
    assert rank(scores, regions, options, 0.001)[0] != 5  # without the term, a tile first
    assert rank(scores + penalty, regions, options, 0.001)[0] == 5
    # Off, or a floor above every repetition: no change.
    assert not repetition_penalty(repetition, ResultOptions()).any()
    assert not repetition_penalty(repetition, ResultOptions(repetition=1, repetition_floor=1)).any()


def test_region_set_repetition_is_per_image() -> None:
    rng = np.random.default_rng(12)
    masks = _random_regions(rng, 18)
    image_of = np.repeat([0, 1], 9)
    vectors = _unit(rng, 18)
    vectors[10] = vectors[1]  # alike, but in another image: no repetition between them
    rles = rle_mod.encode_many(masks)
    per_image = [rles[:9], rles[9:]]
    regions = RegionSet(
        "t",
        per_image,
        image_of,
        masks.reshape(18, -1).mean(1),
        np.zeros((18, 1)),
        np.zeros((18, 1), np.int64),
        [rle_mod.iou_matrix(r, r) for r in per_image],
        np.tile(np.arange(9), 2),
    )
    expected = brute_force_repetition(image_of, vectors, masks, 2)
    np.testing.assert_allclose(regions.repetition(vectors, 2), expected, rtol=1e-5, atol=1e-6)


def test_repetition_options() -> None:
    assert ResultOptions(repetition=0.5).filters
    assert ResultOptions.plain().repetition == 0
    for bad in ({"repetition": -1}, {"repetition_floor": 1.5}, {"repetition_neighbours": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ResultOptions(**bad)


def test_image_masks_cache_is_bounded_and_never_serves_unknown_regions() -> None:
    from regionsearch.search.mask_relations import ImageMasks, ImageMasksCache

    masks = _random_regions(np.random.default_rng(13), 4)
    rles = rle_mod.encode_many(masks)

    def entry(ids: list[int]) -> ImageMasks:
        inside = rle_mod.iou_matrix(rles, rles, crowd_b=[True] * 4)
        area = masks.reshape(4, -1).sum(1).astype(float)
        return ImageMasks(np.asarray(ids), area, inside * area[:, None])

    first = entry([10, 11, 12, 13])
    np.testing.assert_allclose(first.cover(), mask_cover(rles), atol=1e-9)
    np.testing.assert_allclose(
        first.iou(first.rows([13, 10])), rle_mod.iou_matrix([rles[3], rles[0]], [rles[3], rles[0]])
    )
    cache = ImageMasksCache(max_images=2)
    cache.put(1, first)
    assert cache.get(1, [10, 13]) is first
    assert cache.get(1, [10, 14]) is None  # a region it never saw (the image was re-indexed)
    cache.put(2, entry([20, 21, 22, 23]))
    assert cache.get(1, [10]) is first  # 1 is now the most recently used
    cache.put(3, entry([30, 31, 32, 33]))  # evicts 2, the least recently used
    assert len(cache) == 2
    assert cache.get(2, [20]) is None and cache.get(1, [11]) is first
