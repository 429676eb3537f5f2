"""Result switches of a search (calibration, priors, duplicates, supersets, open set,
repetition), each fast path against a slow reference."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from search_references import brute_force_supersets, random_rectangles

from regionsearch.eval.search_task import rank
from regionsearch.masks import rle as rle_mod
from regionsearch.search.postprocess import (
    ResultOptions,
    calibrate_query,
    degenerate,
    drop_supersets,
    grid_cell_fraction,
    hubness_direction,
    mask_cover,
    objectness_prior,
    suppress_duplicates,
)

# ---------------------------------------------------------------------- switches


def test_drop_supersets_equals_brute_force() -> None:
    rng = np.random.default_rng(4)
    masks = random_rectangles(rng, 30)
    image_of = rng.integers(0, 3, 30)
    masks[8], image_of[8] = masks[3] | masks[4], image_of[3]  # a certain superset of 3
    scores = rng.uniform(0, 0.1, 30)
    rles = rle_mod.encode_many(masks)
    area = masks.reshape(30, -1).sum(1)

    def cover_of(members: list[int]) -> np.ndarray:
        return mask_cover([rles[m] for m in members])

    for margin, cover in ((0.0, 0.8), (0.02, 0.8), (0.05, 0.5), (1.0, 1.0)):
        got = drop_supersets(image_of, scores, area, cover_of, margin, cover)
        assert got.tolist() == brute_force_supersets(image_of, scores, masks, margin, cover)
    assert drop_supersets(image_of, scores, area, cover_of, 1.0, 0.8).any()
    # Hand-made: an object (20 px) and the object plus background (60 px) of one image.
    small = np.zeros((2, 10, 10), bool)
    small[0, :2, :10] = True
    small[1, :6, :10] = True
    nest = rle_mod.encode_many(small)
    assert mask_cover(nest)[1, 0] == pytest.approx(1.0)  # all of 0 lies inside 1
    assert mask_cover(nest)[0, 1] == pytest.approx(20 / 60)

    def nested(members: list[int]) -> np.ndarray:
        return mask_cover([nest[m] for m in members])

    for inner, outer, expected in ((0.49, 0.5, [False, True]), (0.45, 0.5, [False, False])):
        got = drop_supersets([0, 0], [inner, outer], [20, 60], nested, 0.02, 0.8)
        assert got.tolist() == expected  # the union goes only if the object is close behind
    assert not drop_supersets([0, 1], [0.5, 0.5], [20, 60], nested, 0.02, 0.8).any()
    with pytest.raises(ValueError, match="superset_margin"):
        ResultOptions(superset_margin=-0.1)
    with pytest.raises(ValueError, match="superset_cover"):
        ResultOptions(superset_cover=0.0)
    assert ResultOptions(superset_margin=0.03).score_slack == 0.03
    assert ResultOptions.plain().score_slack == 0.0


def test_suppress_duplicates_equals_brute_force() -> None:
    rng = np.random.default_rng(0)
    masks = random_rectangles(rng, 30)
    image_of = rng.integers(0, 3, 30)
    masks[7], image_of[7] = masks[2], image_of[2]  # a certain duplicate

    def iou(a: np.ndarray, b: np.ndarray) -> float:
        return (a & b).sum() / (a | b).sum()

    for threshold in (0.2, 0.5):
        keep = suppress_duplicates(image_of, masks, threshold)
        expected: list[int] = []
        for i in range(30):
            rivals = [j for j in expected if image_of[j] == image_of[i]]
            if all(iou(masks[i], masks[j]) < threshold for j in rivals):
                expected.append(i)
        assert np.flatnonzero(keep).tolist() == expected
        assert expected != list(range(30))  # something was suppressed
        rles = rle_mod.encode_many(masks)
        assert suppress_duplicates(image_of, rles, threshold).tolist() == keep.tolist()
    # identical masks of different images never suppress each other
    same = np.repeat(masks[:1], 3, axis=0)
    assert suppress_duplicates([0, 1, 2], same, 0.5).all()
    assert suppress_duplicates([0, 0, 2], same, 0.5).tolist() == [True, False, True]


def test_calibration_is_mean_bank_similarity_subtracted() -> None:
    rng = np.random.default_rng(1)
    unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731
    regions, bank, query = unit(rng.normal(size=(50, 16))), unit(rng.normal(size=(7, 16))), None
    query = unit(rng.normal(size=16))
    for weight in (0.0, 0.5, 1.0):
        direct = regions @ query - weight * (regions @ bank.T).mean(axis=1)
        shifted = regions @ calibrate_query(query, hubness_direction(bank), weight)
        np.testing.assert_allclose(shifted, direct, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="non-empty"):
        hubness_direction(np.zeros((0, 16)))


def test_degenerate_and_objectness_priors() -> None:
    cell = grid_cell_fraction(8, 96)
    assert cell == pytest.approx(1 / 144)
    options = ResultOptions(min_cells=1.5, max_area=0.9)
    area = np.array([0.5 * cell, 1.4 * cell, 1.6 * cell, 0.5, 0.91, 1.0])
    assert degenerate(area, options, cell).tolist() == [True, True, False, False, True, True]
    assert not degenerate(area, ResultOptions.plain(), cell).any()
    # The default keeps objects of a cell or so (small objects on wide canvases are common):
    # only specks under half a cell go.
    small = np.array([0.4 * cell, 0.6 * cell, 1.0 * cell])
    assert degenerate(small, ResultOptions(), cell).tolist() == [True, False, False]
    prior = objectness_prior([1.0, 0.5, None, 0.0, float("nan")], 0.1)
    np.testing.assert_allclose(prior, [0, 0.1 * np.log(0.5), 0, 0.1 * np.log(1e-4), 0])
    assert (prior <= 0).all()
    with pytest.raises(ValueError, match="max_area"):
        ResultOptions(max_area=0)
    with pytest.raises(ValueError, match="calibration"):
        ResultOptions(calibration=-1)


def test_rank_applies_switches_in_order() -> None:
    """rank(): prior, then degenerate regions out, then supersets, then NMS over the rest."""
    from regionsearch.eval.search_collection import RegionSet

    rng = np.random.default_rng(2)
    masks = random_rectangles(rng, 12)
    masks[11] = True  # the whole image
    masks[10] = masks[2] | masks[3]  # holds two regions
    rles = rle_mod.encode_many(masks)
    regions = RegionSet(
        "t",
        [rles],
        np.zeros(12, np.int64),
        masks.reshape(12, -1).mean(1),
        np.zeros((12, 1)),
        np.zeros((12, 1), np.int64),
        [rle_mod.iou_matrix(rles, rles)],
        np.arange(12),
        rng.uniform(0.01, 1, 12),
    )
    scores = rng.normal(size=12, scale=0.05)
    scores[11] = 10.0
    for options in (
        ResultOptions(),
        ResultOptions.plain(),
        ResultOptions(dedupe_iou=0.2),
        ResultOptions(superset_margin=0.1, superset_cover=0.5),
    ):
        adjusted = scores + objectness_prior(regions.objectness, options.objectness)
        order = [
            i
            for i in np.argsort(-adjusted, kind="stable")
            if not degenerate(regions.area[[i]], options, 0.01)[0]
        ]
        if options.superset_margin is not None:
            gone = brute_force_supersets(
                [0] * len(order),
                adjusted[order],
                masks[order],
                options.superset_margin,
                options.superset_cover,
            )
            order = [i for i, g in zip(order, gone, strict=True) if not g]
        if options.dedupe_iou is not None:
            flags = suppress_duplicates(np.zeros(len(order)), masks[order], options.dedupe_iou)
            order = [i for i, f in zip(order, flags, strict=True) if f]
        assert rank(scores, regions, options, 0.01).tolist() == order
    assert 11 not in rank(scores, regions, ResultOptions(), 0.01).tolist()
    loose = ResultOptions(superset_margin=1.0, superset_cover=0.5, dedupe_iou=None)
    assert 10 in rank(scores, regions, dataclasses.replace(loose, superset_margin=None), 0.01)
    assert 10 not in rank(scores, regions, loose, 0.01)
