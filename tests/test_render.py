"""Result pictures: the spotlit region and the encoders."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from regionsearch.masks import rle as rle_mod
from regionsearch.search.render import DIM, SPOTLIGHT_EDGE, encode_picture, spotlight


def _image_and_mask() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(60, 80, 3), dtype=np.uint8)
    mask = np.zeros((60, 80), bool)
    mask[10:40, 20:60] = True
    return image, mask


def test_spotlight_keeps_the_region_dims_the_rest_and_edges_it():
    image, mask = _image_and_mask()
    out = spotlight(image, rle_mod.encode(mask), thickness=2)
    outside = ~mask
    expected_dim = (image[outside].astype(np.float64) * DIM).round()
    assert np.abs(out[outside] - expected_dim).max() <= 1.0
    inner = np.zeros_like(mask)
    inner[12:38, 22:58] = True  # two pixels in from the edge
    assert np.array_equal(out[inner], image[inner])
    edge = mask & ~inner
    assert (out[edge] == SPOTLIGHT_EDGE).all()


def test_spotlight_rescales_a_mask_to_a_downsized_image():
    image, mask = _image_and_mask()
    small = np.asarray(Image.fromarray(image).resize((40, 30)))
    out = spotlight(small, rle_mod.encode(mask), thickness=1)
    assert out.shape == small.shape
    assert np.array_equal(out[10, 20], small[10, 20]) and (out[0, 0] <= small[0, 0]).all()


def test_encode_picture_formats():
    image, _ = _image_and_mask()
    jpeg, png = encode_picture(image, "jpeg"), encode_picture(image, "png")
    assert Image.open(io.BytesIO(jpeg)).format == "JPEG"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png))), image)
    with pytest.raises(ValueError, match="unknown picture format"):
        encode_picture(image, "gif")
