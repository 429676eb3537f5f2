"""World v2 and its domain-randomised family: exact masks under patterns and object-coloured
backgrounds, colour that does not isolate objects, disjoint families, unambiguous expressions."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
from world_helpers import COLOUR_PATTERN, SHAPE_PATTERN, erode, resolve

from regionsearch.eval.world.generate import generate_dataset, render_indexed_scene
from regionsearch.eval.world.text import referring_expressions
from regionsearch.eval.world.vocab import COLOURS


def _v2_scenes(family: str, n: int = 30, seed: int = 5, **kwargs):
    from regionsearch.eval.world.scene_v2 import render_scene_v2

    rng = np.random.default_rng(seed)
    return [render_scene_v2(rng, family, 96, **kwargs) for _ in range(n)]


def test_v2_masks_are_exact_with_patterns_and_object_coloured_backgrounds():
    from dataclasses import replace as dc_replace

    from regionsearch.eval.world.scene_v2 import FAMILIES

    # Degradations off so pixel colours can be checked; everything else as in training.
    clean = dc_replace(FAMILIES["train"], degrade_prob=0.0)
    patterned = 0
    for scene in _v2_scenes(clean, n=40, min_objects=2, max_objects=6):
        h, w = scene.image.shape[:2]
        assert min(h, w) == 96 and max(h, w) <= round(96 * 1.6)
        assert scene.masks.shape == (len(scene.objects), h, w)
        assert scene.masks.sum(axis=0).max() <= 1, "instance masks overlap"
        img = scene.image.astype(np.int64)
        for obj, mask in zip(scene.objects, scene.masks, strict=True):
            assert obj.area == int(mask.sum()) >= 0.5 * obj.full_area
            inner = erode(mask, 2)
            if inner.sum() < 20:
                continue
            near_primary = np.abs(img[inner] - np.asarray(obj.rgb)).max(axis=-1) <= 1
            if obj.secondary_rgb is None:
                assert near_primary.mean() >= 0.97, obj
                continue
            patterned += 1
            assert obj.secondary_colour != obj.colour
            near_second = np.abs(img[inner] - np.asarray(obj.secondary_rgb)).max(axis=-1) <= 1
            # Interior pixels are one of the object's two colours (a blend only along the
            # pattern's own edges), and the named colour is the majority.
            assert (near_primary | near_second).mean() >= 0.85, obj
            assert near_primary.sum() > near_second.sum(), obj
    assert patterned >= 10


def test_v2_colour_does_not_isolate_objects():
    scenes = _v2_scenes("train", n=60, min_objects=3, max_objects=6)
    shared = sum(
        any(
            sum(o.colour == a.colour for o in scene.objects) >= 2
            and len({o.shape for o in scene.objects if o.colour == a.colour}) >= 2
            for a in scene.objects
        )
        for scene in scenes
    )
    assert shared >= 0.4 * len(scenes)
    # Textured backgrounds paint with object colours: some background pixels equal one.
    from regionsearch.eval.world.scene_v2 import render_background_v2

    rng = np.random.default_rng(0)
    refs = np.asarray(list(COLOURS.values()), dtype=np.float64)
    hits = 0
    for _ in range(10):
        bg = render_background_v2(rng, (64, 80), "stripes").reshape(-1, 1, 3)
        hits += int((np.abs(bg - refs[None]).max(axis=-1) <= 1).any())
    assert hits >= 5


def test_v2_families_are_disjoint_and_heldout_is_what_it_says():
    from regionsearch.eval.world.scene_v2 import FAMILIES

    train, held = FAMILIES["train"], FAMILIES["heldout"]
    assert not set(train.backgrounds) & set(held.backgrounds)
    assert set(held.patterns) - set(train.patterns)  # a pattern training never renders
    assert train.aspect[1] < held.aspect[0]
    for scene in _v2_scenes("heldout", n=20):
        assert scene.background in held.backgrounds
        h, w = scene.image.shape[:2]
        assert held.aspect[0] - 0.02 <= max(h, w) / min(h, w) <= held.aspect[1] + 0.02
        assert {o.pattern for o in scene.objects} <= set(held.patterns)
    for scene in _v2_scenes("train", n=20):
        assert scene.background in train.backgrounds
        h, w = scene.image.shape[:2]
        assert max(h, w) / min(h, w) <= train.aspect[1] + 0.02
        assert {o.pattern for o in scene.objects} <= set(train.patterns)
    with pytest.raises(ValueError, match="unknown world family"):
        _v2_scenes("nope", n=1)


def test_v2_small_objects_and_determinism():
    from regionsearch.eval.world.scene_v2 import render_scene_v2

    sizes = [
        o.size / min(s.image.shape[:2])
        for s in _v2_scenes("train", n=40, min_objects=1, max_objects=4)
        for o in s.objects
    ]
    assert min(sizes) < 0.09 and max(sizes) > 0.3
    a = render_scene_v2(np.random.default_rng(11), "heldout", 96, n_objects=4)
    b = render_scene_v2(np.random.default_rng(11), "heldout", 96, n_objects=4)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.masks, b.masks)
    assert a.objects == b.objects
    c = render_scene_v2(np.random.default_rng(12), "heldout", 96, n_objects=4)
    assert not np.array_equal(a.image, c.image)


def test_v2_expressions_are_unambiguous_and_keep_relations():
    n_expr, context = 0, 0
    for i in range(60):
        scene = render_indexed_scene(31, i, size=96, min_objects=3, max_objects=6, family="train")
        h, w = scene.image.shape[:2]
        for obj in scene.objects:
            for sentence in referring_expressions(
                obj, scene.objects, (h, w), context_relations=True
            ):
                assert resolve(sentence, scene.objects) == [obj], (sentence, obj)
                if sentence.endswith(" object"):
                    # No other object shows the colour, not even as a stripe or half.
                    colour = sentence.split()[1]
                    others = [o for o in scene.objects if o is not obj]
                    assert all(colour not in (o.colour, o.secondary_colour) for o in others)
                n_expr += 1
                m = re.fullmatch(
                    rf"the (?:{COLOUR_PATTERN}) (?:{SHAPE_PATTERN}) \w+ ?\w* the (?:{SHAPE_PATTERN})",
                    sentence,
                )
                context += bool(m)
    assert n_expr > 300 and context > 30


def test_v2_dataset_files(tmp_path):
    from pycocotools.coco import COCO

    summary = generate_dataset(tmp_path / "a", n=6, seed=3, size=96, family="heldout")
    coco = COCO(str(tmp_path / "a" / "instances.json"))
    images = coco.loadImgs(coco.getImgIds())
    assert len(images) == 6 == summary["images"]
    assert any(i["width"] != i["height"] for i in images)
    assert {i["family"] for i in images} == {"heldout"}
    for ann in coco.loadAnns(coco.getAnnIds()):
        assert coco.annToMask(ann).sum() == ann["area"] > 0
        assert ann["attributes"]["pattern"] in ("flat", "dots")
    generate_dataset(tmp_path / "b", n=6, seed=3, size=96, family="heldout")
    assert (tmp_path / "a" / "instances.json").read_bytes() == (
        tmp_path / "b" / "instances.json"
    ).read_bytes()
    with pytest.raises(ValueError, match="unknown world family"):
        generate_dataset(tmp_path / "c", n=1, family="bogus")


def test_v2_textured_backgrounds_paint_object_colours_without_vocabulary_squares():
    from regionsearch.eval.world.scene_v2 import render_background_v2

    refs = np.asarray(list(COLOURS.values()), dtype=np.float64)
    rng = np.random.default_rng(4)
    for kind in ("tiles", "waves", "blobs"):
        hits = textured = 0
        for _ in range(12):
            bg = render_background_v2(rng, (60, 90), kind)
            assert bg.shape == (60, 90, 3)
            # Colours are drawn independently, so now and then two coincide (a flat background).
            textured += len(np.unique(bg.reshape(-1, 3), axis=0)) >= 2
            hits += int((np.abs(bg.reshape(-1, 1, 3) - refs[None]).max(axis=-1) <= 1).any())
        assert hits >= 3 and textured >= 9, kind
    # An axis-aligned grid of square tiles changes colour at the same columns on every row of
    # a tile row; irregular tiles (no vocabulary squares) almost never do.
    same = total = 0
    for _ in range(5):
        bg = render_background_v2(rng, (80, 80), "tiles")
        change = np.abs(np.diff(bg, axis=1)).sum(axis=-1) > 0
        rows = [frozenset(np.nonzero(r)[0]) for r in change]
        pairs = [(a, b) for a, b in itertools.pairwise(rows) if a or b]
        same += sum(a == b for a, b in pairs)
        total += len(pairs)
    assert total and same / total < 0.5


# ------------------------------------------------- world v2, domain-randomised training family
def test_dr_backgrounds_render_deterministically_with_object_colours():
    from regionsearch.eval.world.scene_v2 import render_background_v2
    from regionsearch.eval.world.textures import DR_BACKGROUNDS

    refs = np.asarray(list(COLOURS.values()), dtype=np.float64)
    for kind in DR_BACKGROUNDS:
        a = render_background_v2(np.random.default_rng(8), (50, 130), kind, 0.6)
        b = render_background_v2(np.random.default_rng(8), (50, 130), kind, 0.6)
        c = render_background_v2(np.random.default_rng(9), (50, 130), kind, 0.6)
        assert a.shape == (50, 130, 3) and a.dtype == np.float32, kind
        assert np.array_equal(a, b) and not np.array_equal(a, c), kind
        rng = np.random.default_rng(1)
        hits = textured = 0
        for _ in range(8):
            bg = render_background_v2(rng, (40, 60), kind, 0.6)
            assert np.isfinite(bg).all() and bg.min() >= 0 and bg.max() <= 255, kind
            textured += len(np.unique(bg.reshape(-1, 3), axis=0)) >= 3
            hits += int((np.abs(bg.reshape(-1, 1, 3) - refs[None]).max(axis=-1) <= 1).any())
        # Object colours behind objects are the point; a photo-like field blends them.
        assert textured >= 6 and (hits >= 3 or kind == "photo"), kind
    with pytest.raises(ValueError, match="unknown background kind"):
        render_background_v2(np.random.default_rng(0), (8, 8), "voronoi")


def test_dr_patterns_keep_the_named_colour_the_majority():
    from regionsearch.eval.world.textures import DR_PATTERNS, dr_pattern_share

    yy, xx = np.mgrid[0:64, 0:64].astype(np.float32)
    u, v = xx + 0.5 - 32, yy + 0.5 - 32
    disc = u * u + v * v < 30**2
    rng = np.random.default_rng(2)
    for pattern in DR_PATTERNS:
        for _ in range(10):
            share = dr_pattern_share(rng, pattern, u, v, 30.0)
            assert share.shape == (64, 64) and share.min() >= 0 and share.max() <= 1, pattern
            assert 0.05 < share[disc].mean() < 0.4, pattern
    with pytest.raises(ValueError, match="unknown pattern"):
        dr_pattern_share(rng, "dots", u, v, 30.0)


@pytest.mark.parametrize("family", ["train-dr", "train-dr2"])
def test_dr_family_masks_are_exact_and_it_renders_what_it_says(family):
    from dataclasses import replace as dc_replace

    from regionsearch.eval.world.scene_v2 import FAMILIES

    dr, held = FAMILIES[family], FAMILIES["heldout"]
    # Domain randomisation must not borrow the held-out family's renderings.
    assert not set(dr.backgrounds) & set(held.backgrounds)
    assert not (set(held.patterns) - {"flat"}) & set(dr.patterns)
    assert dr.aspect[1] >= 2.5 and dr.size_range[0] <= 0.06
    clean = dc_replace(dr, degrade_prob=0.0)
    backgrounds, patterns, aspects = set(), set(), []
    for scene in _v2_scenes(clean, n=60, seed=6, min_objects=2, max_objects=5):
        h, w = scene.image.shape[:2]
        aspects.append(max(h, w) / min(h, w))
        backgrounds.add(scene.background)
        assert scene.masks.shape == (len(scene.objects), h, w)
        assert scene.masks.sum(axis=0).max() <= 1, "instance masks overlap"
        img = scene.image.astype(np.float64)
        for obj, mask in zip(scene.objects, scene.masks, strict=True):
            patterns.add(obj.pattern)
            assert obj.area == int(mask.sum()) > 0
            inner = erode(mask, 2)
            if inner.sum() < 20:
                continue
            primary = np.asarray(obj.rgb, np.float64)
            if obj.secondary_rgb is None:
                assert (np.abs(img[inner] - primary).max(axis=-1) <= 1).mean() >= 0.9, obj
                continue
            # Interior pixels lie between the two colours (occluders never cover a mask pixel),
            # nearer the named one on average.
            d = np.asarray(obj.secondary_rgb, np.float64) - primary
            s = (img[inner] - primary) @ d / (d @ d)
            residual = np.linalg.norm(img[inner] - primary - s[:, None] * d[None], axis=-1)
            on_segment = (residual <= 2.5) & (s > -0.02) & (s < 1.02)
            assert on_segment.mean() >= 0.85, obj
            assert s[on_segment].mean() < 0.5, obj
    assert max(aspects) > 1.8 and max(aspects) <= dr.aspect[1] + 0.02
    assert len(backgrounds) >= 8 and len(patterns) >= 5
    assert ("marks" in patterns) == (family == "train-dr2")


def test_patterned_family_differs_from_train_dr2_only_in_how_often_fills_are_flat():
    from collections import Counter
    from dataclasses import replace as dc_replace

    from regionsearch.eval.world.scene_v2 import FAMILIES

    drp, dr2 = FAMILIES["train-drp"], FAMILIES["train-dr2"]
    assert dc_replace(drp, name=dr2.name, pattern_weights=dr2.pattern_weights) == dr2
    assert drp.patterns[0] == "flat" and len(drp.pattern_weights) == len(drp.patterns)
    assert sum(drp.pattern_weights) == pytest.approx(1.0)
    counts: dict[str, Counter] = {}
    for name in ("train-dr2", "train-drp"):
        scenes = _v2_scenes(name, n=60, seed=8, min_objects=3, max_objects=5)
        counts[name] = Counter(o.pattern for scene in scenes for o in scene.objects)
    flat = {k: c["flat"] / sum(c.values()) for k, c in counts.items()}
    assert flat["train-drp"] < 0.2 and flat["train-dr2"] > 0.25, flat
    assert set(counts["train-drp"]) == set(drp.patterns), counts["train-drp"]


def test_dr_family_is_deterministic_and_train_family_unchanged_by_defaults():
    from dataclasses import replace as dc_replace

    from regionsearch.eval.world.scene_v2 import FAMILIES, render_scene_v2

    a = render_scene_v2(np.random.default_rng(21), "train-dr", 96, n_objects=4)
    b = render_scene_v2(np.random.default_rng(21), "train-dr", 96, n_objects=4)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.masks, b.masks)
    assert a.objects == b.objects
    # The new knobs at their defaults draw nothing extra: ``train`` renders as it always did.
    train = FAMILIES["train"]
    explicit = dc_replace(train, degrade_strength=1.0, occluder_prob=0.0, object_colour_share=0.5)
    for seed in range(5):
        x = render_scene_v2(np.random.default_rng(seed), train, 96)
        y = render_scene_v2(np.random.default_rng(seed), explicit, 96)
        assert np.array_equal(x.image, y.image) and x.objects == y.objects
