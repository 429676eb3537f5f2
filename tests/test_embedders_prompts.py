"""Visual-prompt baselines: the prompted images are what they claim, and embed like photos."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_masks

from regionsearch.backbone import Backbone
from regionsearch.embedders import get_embedder
from regionsearch.embedders.prompts import (
    RED,
    BlurEmbedder,
    CropEmbedder,
    GlobalEmbedder,
    MaskedCropEmbedder,
    RedCircleEmbedder,
    binarize_masks,
    encode_prompted,
    mask_box,
    mean_colour,
)
from regionsearch.errors import InvalidMaskError

NAMES = ["global", "crop", "masked-crop", "red-circle", "blur"]


def rect_mask(height: int, width: int, top: int, left: int, bottom: int, right: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=bool)
    mask[top:bottom, left:right] = True
    return mask


# ---------------------------------------------------------------------- common contract
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("count", [1, 3, 17])
def test_shapes_unit_norm_deterministic(
    tiny_backbone_f32: Backbone,
    rng: np.random.Generator,
    random_image: np.ndarray,
    name: str,
    count: int,
) -> None:
    embedder = get_embedder(name, tiny_backbone_f32)
    masks = random_masks(rng, count, *random_image.shape[:2])
    first = embedder.embed(random_image, masks)
    assert first.shape == (count, tiny_backbone_f32.embed_dim)
    assert first.dtype == torch.float32
    torch.testing.assert_close(first.norm(dim=1), torch.ones(count), atol=1e-5, rtol=0)
    if count <= 3:  # determinism; the 17-mask case only checks shapes, to keep the suite fast
        assert torch.equal(first, embedder.embed(random_image, masks))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "masks",
    [
        pytest.param(np.zeros((2, 40, 56), dtype=bool), id="empty"),
        pytest.param(np.ones((1, 40, 55), dtype=bool), id="wrong-size"),
        pytest.param(np.zeros((0, 40, 56), dtype=bool), id="zero-masks"),
        pytest.param(np.full((1, 40, 56), 1.5, dtype=np.float32), id="above-one"),
        pytest.param(np.full((1, 40, 56), -0.2, dtype=np.float32), id="negative"),
    ],
)
def test_bad_masks_rejected(
    tiny_backbone_f32: Backbone, random_image: np.ndarray, name: str, masks: np.ndarray
) -> None:
    with pytest.raises(InvalidMaskError):
        get_embedder(name, tiny_backbone_f32).embed(random_image, masks)


def test_options_validated(tiny_backbone_f32: Backbone) -> None:
    with pytest.raises(ValueError, match="multiple of the patch size"):
        CropEmbedder(tiny_backbone_f32, resolution=30)
    with pytest.raises(ValueError, match="margin"):
        CropEmbedder(tiny_backbone_f32, margin=-0.1)
    with pytest.raises(ValueError, match="outside"):
        BlurEmbedder(tiny_backbone_f32, outside="pixelate")
    with pytest.raises(ValueError, match="batch_size"):
        GlobalEmbedder(tiny_backbone_f32, batch_size=0)
    with pytest.raises(ValueError, match="thickness"):
        RedCircleEmbedder(tiny_backbone_f32, thickness=0)


def test_describe_lists_options(tiny_backbone_f32: Backbone) -> None:
    described = get_embedder("crop", tiny_backbone_f32, margin=0.2, resolution=48).describe()
    assert described == {
        "embedder": "crop",
        "model": tiny_backbone_f32.name,
        "resolution": 48,
        "batch_size": 32,
        "margin": 0.2,
    }
    assert GlobalEmbedder(tiny_backbone_f32).resolution == tiny_backbone_f32.image_size
    assert BlurEmbedder(tiny_backbone_f32, outside="grey").describe()["outside"] == "grey"


# ---------------------------------------------------------------------- helpers
def test_mask_box_margin_and_clamp() -> None:
    mask = rect_mask(40, 56, 10, 20, 20, 40)  # 10 rows x 20 cols
    assert mask_box(mask) == (10, 20, 20, 40)
    assert mask_box(mask, 0.1) == (9, 18, 21, 42)
    corner = rect_mask(40, 56, 0, 50, 5, 56)
    assert mask_box(corner, 0.5) == (0, 47, 8, 56)


def test_binarize_soft_masks() -> None:
    soft = torch.full((2, 6, 6), 0.3)
    soft[0, 1:3, 2:5] = 0.6  # threshold at 0.5 keeps only this block
    soft[1] = 0.0
    soft[1, 4, 4] = 0.2  # never reaches 0.5: falls back to its support
    hard = binarize_masks(soft)
    assert hard.dtype == bool
    np.testing.assert_array_equal(hard[0], rect_mask(6, 6, 1, 2, 3, 5))
    np.testing.assert_array_equal(hard[1], rect_mask(6, 6, 4, 4, 5, 5))


# ---------------------------------------------------------------------- each baseline
def test_global_is_the_image_embedding(tiny_backbone_f32: Backbone, rng, random_image) -> None:
    vectors = GlobalEmbedder(tiny_backbone_f32).embed(random_image, random_masks(rng, 3, 40, 56))
    expected = tiny_backbone_f32.encode_images(tiny_backbone_f32.preprocess(random_image)[None])
    torch.testing.assert_close(vectors, expected.expand(3, -1), atol=1e-6, rtol=0)


def test_crop_box_of_known_rectangle(tiny_backbone_f32: Backbone, random_image: np.ndarray) -> None:
    mask = rect_mask(40, 56, 10, 20, 20, 40)
    embedder = CropEmbedder(tiny_backbone_f32, resolution=48)
    (crop,) = embedder.prompted_images(random_image, mask)
    np.testing.assert_array_equal(crop, random_image[9:21, 18:42])
    expected = encode_prompted(tiny_backbone_f32, [random_image[9:21, 18:42]], 48)
    torch.testing.assert_close(embedder.embed(random_image, mask), expected, atol=1e-6, rtol=0)


def test_soft_mask_crop_uses_threshold(tiny_backbone_f32: Backbone, random_image) -> None:
    soft = np.full((40, 56), 0.2, dtype=np.float32)
    soft[10:20, 20:40] = 0.7
    (crop,) = CropEmbedder(tiny_backbone_f32, margin=0).prompted_images(random_image, soft)
    np.testing.assert_array_equal(crop, random_image[10:20, 20:40])


def test_masked_crop_fills_outside_with_mean(tiny_backbone_f32: Backbone, random_image) -> None:
    mask = np.zeros((40, 56), dtype=bool)
    mask[10:20, 20:40] = True
    mask[10:14, 20:26] = False  # a notch, so the box holds outside pixels
    (crop,) = MaskedCropEmbedder(tiny_backbone_f32).prompted_images(random_image, mask)
    window = (slice(9, 21), slice(18, 42))
    inside = mask[window]
    colour = mean_colour(tiny_backbone_f32)
    assert tuple(colour) == (123, 117, 104)
    assert crop.shape == (12, 24, 3)
    assert (crop[~inside] == colour).all()
    np.testing.assert_array_equal(crop[inside], random_image[window][inside])


def test_red_circle_draws_red_ellipse_around_box(tiny_backbone_f32: Backbone, rng) -> None:
    image = rng.integers(0, 200, size=(64, 80, 3), dtype=np.uint8)  # no pure red pixel
    mask = rect_mask(64, 80, 26, 30, 38, 50)
    embedder = RedCircleEmbedder(tiny_backbone_f32, thickness=0.025)
    (drawn,) = embedder.prompted_images(image, mask)
    assert embedder.line_width(64, 80) == 2
    changed = (drawn != image).any(axis=2)
    assert changed.sum() > 40
    assert (drawn[changed] == RED).all()
    # The box (bar a 1 px border near the ellipse's contact points) is untouched.
    np.testing.assert_array_equal(drawn[27:37, 31:49], image[27:37, 31:49])
    # The ellipse crosses the box's mid-lines outside the box, on all four sides.
    row, col = 32, 40
    assert (drawn[row, :30] == RED).all(axis=1).any() and (drawn[row, 50:] == RED).all(axis=1).any()
    assert (drawn[:26, col] == RED).all(axis=1).any() and (drawn[38:, col] == RED).all(axis=1).any()


@pytest.mark.parametrize("outside", ["blur", "grey"])
def test_blur_keeps_mask_pixels(tiny_backbone_f32: Backbone, random_image, outside: str) -> None:
    mask = rect_mask(40, 56, 5, 10, 25, 30)
    (prompted,) = BlurEmbedder(tiny_backbone_f32, outside=outside).prompted_images(
        random_image, mask
    )
    assert prompted.shape == random_image.shape
    np.testing.assert_array_equal(prompted[mask], random_image[mask])
    if outside == "grey":
        assert (prompted[~mask] == mean_colour(tiny_backbone_f32)).all()
    else:  # blurring noise changes almost every pixel and shrinks the contrast
        assert (prompted[~mask] != random_image[~mask]).any(axis=1).mean() > 0.9
        assert prompted[~mask].std() < random_image[~mask].std() / 2


def test_blur_batches_match_single_prompts(tiny_backbone_f32: Backbone, rng, random_image) -> None:
    masks = random_masks(rng, 5, 40, 56)
    embedder = BlurEmbedder(tiny_backbone_f32, batch_size=2)
    images = embedder.prompted_images(random_image, masks)
    for image, mask in zip(images, masks, strict=True):
        np.testing.assert_array_equal(image, embedder.prompt(random_image, mask))
    expected = encode_prompted(tiny_backbone_f32, images, embedder.resolution, batch_size=64)
    torch.testing.assert_close(embedder.embed(random_image, masks), expected, atol=1e-6, rtol=0)
