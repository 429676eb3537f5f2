"""Automatic (weight-free) proposals on a synthetic scene, and the SAM adapter's error paths."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from regionsearch.masks import AutomaticProposals, RegionProposal, SamProposals
from regionsearch.masks import proposals as proposals_mod
from regionsearch.masks.proposals import DEFAULT_OBJECTNESS, OBJECTNESS_FITS

H, W = 240, 360
RECTS = {  # (row0, row1, col0, col1) -> colour
    (20, 110, 30, 150): (220, 40, 40),
    (140, 220, 40, 120): (40, 180, 60),
    (60, 200, 200, 330): (50, 70, 220),
    (15, 60, 230, 300): (240, 220, 30),
}


def scene() -> tuple[np.ndarray, list[np.ndarray]]:
    """Mid-grey textured background with four flat coloured rectangles."""
    rng = np.random.default_rng(0)
    image = np.full((H, W, 3), 128, dtype=np.int16)
    image += rng.integers(-12, 13, size=(H, W, 1), dtype=np.int16)
    truths = []
    for (r0, r1, c0, c1), colour in RECTS.items():
        image[r0:r1, c0:c1] = np.array(colour) + rng.integers(-6, 7, size=(r1 - r0, c1 - c0, 1))
        m = np.zeros((H, W), dtype=bool)
        m[r0:r1, c0:c1] = True
        truths.append(m)
    return np.clip(image, 0, 255).astype(np.uint8), truths


@pytest.fixture(scope="module")
def synthetic() -> tuple[np.ndarray, list[np.ndarray], list[RegionProposal]]:
    image, truths = scene()
    return image, truths, AutomaticProposals(max_regions=20).propose(image)


def best_iou(truth: np.ndarray, proposals: list[RegionProposal]) -> float:
    return max(
        np.logical_and(truth, p.mask).sum() / np.logical_or(truth, p.mask).sum() for p in proposals
    )


def test_each_rectangle_is_recovered(synthetic) -> None:
    _, truths, proposals = synthetic
    for truth in truths:
        assert best_iou(truth, proposals) > 0.8


def test_ranking_puts_the_objects_first() -> None:
    image, truths = scene()
    top = AutomaticProposals(max_regions=5).propose(image)  # whole image + 4 regions
    for truth in truths:
        assert best_iou(truth, top[1:]) > 0.8


def test_whole_image_region_first_and_shapes(synthetic) -> None:
    _, _, proposals = synthetic
    assert proposals[0].source == "full-image" and proposals[0].mask.all()
    assert all(p.source == "proposal" for p in proposals[1:])
    assert all(p.mask.shape == (H, W) and p.mask.dtype == bool for p in proposals)
    assert all(p.mask.any() and not p.mask.all() for p in proposals[1:])
    scores = [p.score for p in proposals[1:]]
    assert scores == sorted(scores, reverse=True)
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert len(proposals) <= 20


def test_deduplicated_at_threshold(synthetic) -> None:
    _, _, proposals = synthetic
    masks = np.stack([p.mask for p in proposals[1:]]).reshape(len(proposals) - 1, -1)
    m = masks.astype(np.float32)
    inter = m @ m.T
    area = m.sum(1)
    iou = inter / (area[:, None] + area[None, :] - inter)
    np.fill_diagonal(iou, 0)
    # Dedupe runs on a reduced grid, so allow a little slack over the threshold.
    assert iou.max() <= AutomaticProposals().iou_dedupe + 0.05


def test_max_regions_respected_and_min_area() -> None:
    image, _ = scene()
    assert len(AutomaticProposals(max_regions=3).propose(image)) == 3
    only = AutomaticProposals(max_regions=1).propose(image)
    assert len(only) == 1 and only[0].source == "full-image"
    big = AutomaticProposals(max_regions=50, min_area=0.05).propose(image)
    assert all(p.mask.mean() >= 0.045 for p in big[1:])


def test_deterministic(synthetic) -> None:
    image, _, first = synthetic
    second = AutomaticProposals(max_regions=20).propose(image.copy())
    assert len(first) == len(second)
    for a, b in zip(first, second, strict=True):
        assert a.score == b.score
        np.testing.assert_array_equal(a.mask, b.mask)


def test_input_forms(tmp_path: Path) -> None:
    image, _ = scene()
    proposer = AutomaticProposals(max_regions=10)
    grey = proposer.propose(image.mean(axis=2).astype(np.uint8))
    assert grey[0].mask.shape == (H, W) and len(grey) > 1
    floats = proposer.propose(image.astype(np.float32) / 255.0)
    assert len(floats) > 1
    path = tmp_path / "scene.png"
    Image.fromarray(image).save(path)
    from_disk = proposer.masks_for(path, None)
    in_memory = proposer.masks_for(path, image)
    assert [p.score for p in from_disk] == [p.score for p in in_memory]
    # from disk the photo is decoded as the indexer decodes it: EXIF orientation applied
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 90 degrees off: displayed with width and height swapped
    Image.fromarray(np.ascontiguousarray(np.rot90(image))).save(rotated, exif=exif, quality=95)
    assert proposer.masks_for(rotated, None)[0].mask.shape == image.shape[:2]
    tiny = proposer.propose(image[:40:, :50])  # smaller than work_size: no upscaling
    assert tiny[0].mask.shape == (40, 50)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_regions": 0}, "max_regions"),
        ({"min_area": 1.5}, "min_area"),
        ({"iou_dedupe": 0.0}, "iou_dedupe"),
        ({"scales": ()}, "scales"),
        ({"scales": (100, -1)}, "scales"),
        ({"work_size": 8}, "work_size"),
        ({"objectness": "imagenet"}, "objectness fit 'imagenet'"),
    ],
)
def test_invalid_parameters(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AutomaticProposals(**kwargs)


@pytest.mark.parametrize("fit", sorted(OBJECTNESS_FITS))
def test_objectness_fit_is_the_logistic_of_its_weights(fit: str) -> None:
    """Every candidate's score is the chosen fit's logistic over the documented features, and
    the returned regions carry the scores of the fit that ranked them (best first)."""
    image, truths = scene()
    proposer = AutomaticProposals(max_regions=10, objectness=fit, work_size=160)  # fast
    small = proposals_mod._shrink(image, proposer.work_size)
    _, pools = proposer._pools(small)
    bias, weights = OBJECTNESS_FITS[fit]
    pixels = small.shape[0] * small.shape[1]
    for pool in pools:
        x = proposals_mod._score_features(pool.feats, pixels)
        assert x.shape[1] == len(weights) == len(proposals_mod._SCORE_FEATURES)
        np.testing.assert_allclose(pool.score, 1.0 / (1.0 + np.exp(-(x @ weights + bias))))
    regions = proposer.propose(image)
    scores = [p.score for p in regions[1:]]
    assert scores == sorted(scores, reverse=True)
    for truth in truths:
        assert best_iou(truth, regions[1:]) > 0.8


def test_objectness_fits_differ_and_the_default_is_one_of_them() -> None:
    assert AutomaticProposals().objectness == DEFAULT_OBJECTNESS in OBJECTNESS_FITS
    assert "objectness=" in repr(AutomaticProposals())
    (b1, w1), (b2, w2) = OBJECTNESS_FITS["coco"], OBJECTNESS_FITS["coco+world"]
    assert b1 != b2 and not np.allclose(w1, w2)


def test_invalid_image() -> None:
    proposer = AutomaticProposals()
    with pytest.raises(ValueError, match="image must be"):
        proposer.propose(np.zeros((4, 4, 2), np.uint8))
    with pytest.raises(ValueError, match="empty"):
        proposer.propose(np.zeros((0, 4, 3), np.uint8))


def test_sam_without_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "segment_anything", None)  # import now fails
    with pytest.raises(ImportError, match=r"pip install 'regionsearch\[sam\]'"):
        SamProposals("sam_vit_h.pth", "vit_h")


@pytest.fixture
def fake_sam(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """A stand-in segment_anything: real weights cannot be used in tests."""
    module = types.ModuleType("segment_anything")

    class Model:
        def to(self, device: str) -> Model:
            return self

    class Generator:
        def __init__(self, model: Model, **kwargs: object) -> None:
            self.kwargs = kwargs

        def generate(self, image: np.ndarray) -> list[dict]:
            h, w = image.shape[:2]
            out = []
            for i, q in enumerate([0.7, 0.95, 0.8]):
                m = np.zeros((h, w), dtype=bool)
                m[i : i + 2] = True
                out.append({"segmentation": m, "predicted_iou": q})
            return out

    module.sam_model_registry = {"vit_b": lambda checkpoint: Model()}
    module.SamAutomaticMaskGenerator = Generator
    monkeypatch.setitem(sys.modules, "segment_anything", module)
    return module


def test_sam_missing_checkpoint_and_bad_model(fake_sam, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        SamProposals(tmp_path / "absent.pth", "vit_b")
    ckpt = tmp_path / "sam.pth"
    ckpt.write_bytes(b"")
    with pytest.raises(ValueError, match="unknown SAM model_type"):
        SamProposals(ckpt, "vit_z")


def test_sam_adapter_orders_by_predicted_iou(fake_sam, tmp_path: Path) -> None:
    ckpt = tmp_path / "sam.pth"
    ckpt.write_bytes(b"")
    regions = SamProposals(ckpt, "vit_b", max_regions=3).masks_for(
        Path("x.jpg"), np.zeros((8, 6, 3), np.uint8)
    )
    assert [r.source for r in regions] == ["full-image", "sam", "sam"]
    assert [r.score for r in regions[1:]] == [0.95, 0.8]
    assert regions[1].mask[1].all() and not regions[1].mask[0].any()
