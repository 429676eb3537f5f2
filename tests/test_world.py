"""The synthetic world: exact masks, determinism, COCO output, unambiguous expressions."""

from __future__ import annotations

import json

import numpy as np
import pytest
from world_helpers import RELATIONS, SUPERLATIVES, dilate, erode, resolve

from regionsearch.eval.world.generate import generate_dataset, render_indexed_scene
from regionsearch.eval.world.scene import render_scene
from regionsearch.eval.world.text import referring_expressions, scene_caption
from regionsearch.eval.world.vocab import (
    BACKGROUND_MIN_DISTANCE,
    COLOUR_JITTER,
    COLOUR_NAMES,
    COLOURS,
    SHAPES,
    class_names,
)


def _scenes(n: int = 40, size: int = 128, seed: int = 3):
    rng = np.random.default_rng(seed)
    return [render_scene(rng, size) for _ in range(n)]


def test_masks_are_exact_and_disjoint():
    for scene in _scenes():
        assert scene.masks.shape[0] == len(scene.objects) >= 1
        assert scene.masks.dtype == bool
        assert scene.masks.sum(axis=0).max() <= 1, "instance masks overlap"
        img = scene.image.astype(np.int64)
        for obj, mask in zip(scene.objects, scene.masks, strict=True):
            # Away from anti-aliased edges, every mask pixel has the object's own colour.
            # (Thin anti-aliased slivers of an occluder may tint a few interior pixels.)
            inner = erode(mask, 2)
            if inner.any():
                diff = np.abs(img[inner] - np.asarray(obj.rgb)).max(axis=-1)
                assert (diff <= 1).mean() >= 0.97, obj
            # Every mask pixel is at least half the object's colour: closer to it than the
            # colour is to anything else in the scene at that pixel would allow otherwise.
            assert np.abs(img[mask] - np.asarray(obj.rgb)).max() <= 128, obj
            # Every pixel of exactly the object's colour is inside the union of the masks.
            exact = np.abs(img - np.asarray(obj.rgb)).max(axis=-1) <= 1
            assert not (exact & ~scene.masks.any(axis=0)).any()
            # Each object keeps most of its area after occlusion.
            assert obj.area >= 0.6 * obj.full_area
            assert obj.area == int(mask.sum())
            x, y, w, h = obj.bbox
            ys, xs = np.nonzero(mask)
            assert (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1) == (
                x,
                y,
                w,
                h,
            )


def test_background_never_uses_object_colours():
    for scene in _scenes(n=60, size=96, seed=11):
        outside = ~dilate(scene.masks.any(axis=0), 2)
        pixels = scene.image[outside].astype(np.float64)
        refs = np.asarray(list(COLOURS.values()), dtype=np.float64)
        dist = np.sqrt(((pixels[:, None, :] - refs[None]) ** 2).sum(-1)).min(axis=1)
        assert dist.min() >= BACKGROUND_MIN_DISTANCE - COLOUR_JITTER, scene.background


def test_rendering_is_deterministic_and_sized():
    a = render_indexed_scene(5, 17, size=96)
    b = render_indexed_scene(5, 17, size=96)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.masks, b.masks)
    assert a.objects == b.objects
    rect = render_scene(np.random.default_rng(0), (80, 120), n_objects=3)
    assert rect.image.shape == (80, 120, 3) and rect.masks.shape[1:] == (80, 120)


def test_vocabulary():
    names = class_names()
    assert len(names) == 64 == len(set(names))
    assert len(SHAPES) == 8 and len(COLOUR_NAMES) == 8


def test_expressions_are_correct_and_unambiguous():
    n_expr, kinds = 0, set()
    for i in range(150):
        scene = render_indexed_scene(21, i, size=128, min_objects=2, max_objects=6)
        for obj in scene.objects:
            for sentence in referring_expressions(obj, scene.objects, (128, 128)):
                hits = resolve(sentence, scene.objects)
                assert hits == [obj], (sentence, obj, scene.objects)
                n_expr += 1
                kinds.add(
                    sentence.split()[1]
                    if sentence.split()[1] in SUPERLATIVES
                    or sentence.split()[1] in ("larger", "smaller", "largest", "smallest")
                    else ("rel" if any(r in sentence for r in RELATIONS) else "attr")
                )
    assert n_expr > 300
    assert {"attr", "rel", "leftmost"} <= kinds and kinds & {
        "larger",
        "smaller",
        "largest",
        "smallest",
    }


def test_caption_mentions_every_object():
    rng = np.random.default_rng(0)
    for i in range(40):
        scene = render_indexed_scene(4, i, size=96)
        caption = scene_caption(scene.objects, rng, (96, 96))
        for obj in scene.objects:
            plural = obj.shape + ("es" if obj.shape.endswith(("s", "x")) else "s")
            assert f"{obj.colour} {obj.shape}" in caption or f"{obj.colour} {plural}" in caption, (
                caption
            )


# ----------------------------------------------------------------- COCO files
@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    summary = generate_dataset(out, n=12, seed=7, size=96)
    return out, summary


def test_coco_files_load(dataset):
    from pycocotools import mask as mask_utils
    from pycocotools.coco import COCO

    out, summary = dataset
    coco = COCO(str(out / "instances.json"))
    assert len(coco.getImgIds()) == 12 == summary["images"]
    cats = coco.loadCats(coco.getCatIds())
    assert sorted(c["name"] for c in cats) == sorted(class_names())
    for ann in coco.loadAnns(coco.getAnnIds()):
        assert isinstance(ann["segmentation"]["counts"], str)
        m = coco.annToMask(ann)
        assert m.sum() == ann["area"] > 0
        assert np.allclose(mask_utils.toBbox(ann["segmentation"]), ann["bbox"])
        assert (out / "images" / coco.loadImgs(ann["image_id"])[0]["file_name"]).is_file()
    expressions = json.loads((out / "expressions.json").read_text())
    ann_ids = set(coco.getAnnIds())
    assert expressions and all(e["ann_id"] in ann_ids and e["sentences"] for e in expressions)
    captions = json.loads((out / "captions.json").read_text())
    assert len(captions["annotations"]) == 12


def test_generation_is_deterministic(dataset, tmp_path):
    out, _ = dataset
    generate_dataset(tmp_path, n=12, seed=7, size=96)
    assert (tmp_path / "instances.json").read_bytes() == (out / "instances.json").read_bytes()
    assert (tmp_path / "expressions.json").read_bytes() == (out / "expressions.json").read_bytes()
    generate_dataset(tmp_path / "other", n=12, seed=8, size=96)
    assert (tmp_path / "other" / "instances.json").read_bytes() != (
        out / "instances.json"
    ).read_bytes()


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--n", "0"], "--n"),
        (["--min-objects", "5", "--max-objects", "2"], "--min-objects"),
        (["--family", "nope"], "--family"),
        (["--difficulty", "insane"], "--difficulty"),
        (["--size", "4"], "--size"),
    ],
)
def test_generate_refuses_bad_arguments_before_writing(tmp_path, args, named):
    from typer.testing import CliRunner

    from regionsearch.eval.world.cli import world_app

    out = tmp_path / "world"
    result = CliRunner().invoke(world_app, ["generate", str(out), "--n", "2", *args])
    assert result.exit_code == 2 and named in result.output, result.output
    assert not out.exists()
