"""Non-object training regions for the Alpha-CLIP variant: what they cover and what they label."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from regionsearch.eval.world.batches import square_scene
from regionsearch.eval.world.region_negatives import (
    MAX_SUPERSET_IOU,
    MIN_AREA,
    background_region,
    negative_region,
    superset_region,
)
from regionsearch.eval.world.scene_v2 import render_scene_v2
from regionsearch.eval.world.train_alphaclip import _with_negatives


def _scenes(n: int = 20):
    rng = np.random.default_rng(5)
    return [render_scene_v2(rng, "train-dr", 64, min_objects=1, max_objects=4) for _ in range(n)]


def test_background_regions_touch_no_object_and_are_not_specks():
    rng = np.random.default_rng(0)
    drawn = 0
    for scene in _scenes():
        region = background_region(rng, scene.masks)
        if region is None:
            continue
        drawn += 1
        assert not (region & scene.masks.any(axis=0)).any()
        assert region.mean() >= MIN_AREA
    assert drawn >= 15


def test_superset_regions_hold_their_object_loosely_and_no_other():
    rng = np.random.default_rng(1)
    drawn = 0
    for scene in _scenes():
        for k in range(len(scene.masks)):
            region = superset_region(rng, scene.masks, k)
            if region is None:
                continue
            drawn += 1
            own = scene.masks[k]
            assert (region & own).sum() == own.sum()  # the whole object is inside
            assert own.sum() / region.sum() < MAX_SUPERSET_IOU  # a miss at IoU 0.5
            others = np.delete(scene.masks, k, axis=0)
            assert not (region[None] & others).any()
    assert drawn >= 20


def test_no_negative_when_objects_fill_the_image():
    full = np.ones((1, 32, 32), dtype=bool)
    assert negative_region(np.random.default_rng(0), full, 0) is None


def test_swapped_items_get_the_none_target_and_whole_image_items_are_kept():
    scenes = [square_scene(s, 64) for s in _scenes(8)]
    batch = len(scenes)
    objects = np.zeros((batch, 6, 64, 64), dtype=bool)
    for i, s in enumerate(scenes):
        objects[i, : len(s.masks)] = s.masks
    n_valid = np.array([len(s.masks) for s in scenes])
    obj = np.zeros(batch, dtype=np.int64)
    masks = torch.from_numpy(objects[np.arange(batch), obj]).float()[:, None].clone()
    before = masks.clone()
    labels = torch.arange(batch)
    whole = torch.zeros(batch, dtype=torch.bool)
    whole[0] = True
    out = _with_negatives(
        np.random.default_rng(3), objects, obj, n_valid, masks, labels, whole, 0.9
    )
    swapped = out == 64
    assert not swapped[0] and torch.equal(masks[0], before[0])  # whole-image items stay
    assert swapped.sum() >= 3
    assert torch.equal(out[~swapped], labels[~swapped])
    for i in torch.nonzero(swapped).flatten().tolist():
        assert not torch.equal(masks[i], before[i])
        own = torch.from_numpy(objects[i, 0]).float()
        inter = float((masks[i, 0] * own).sum())
        union = float(((masks[i, 0] + own) > 0).sum())
        assert inter / max(union, 1.0) < 0.5  # never a hit for the object it replaced


@pytest.mark.parametrize("frac", ["-0.1", "0.95"])
def test_negative_frac_out_of_range_is_a_usage_error(frac):
    from typer.testing import CliRunner

    from regionsearch.eval.world.cli import world_app

    result = CliRunner().invoke(world_app, ["train-alphaclip", "--negative-frac", frac])
    assert result.exit_code == 2 and "--negative-frac" in result.output
