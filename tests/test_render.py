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


def test_contact_sheet_titles_captions_and_spotlights(tmp_path):
    from regionsearch.search.render import contact_sheet
    from regionsearch.search.searcher import RegionHit

    _, mask = _image_and_mask()
    image = np.zeros((60, 80, 3), np.uint8)
    image[:] = (200, 150, 100)
    photo = tmp_path / "photo.png"
    Image.fromarray(image).save(photo)
    rle = rle_mod.encode(mask)
    hits = [
        RegionHit(
            i, 1, f"dir/p{i}.png", (20, 10, 40, 30), rle, float(mask.sum()), 0.3 - i / 10, "t"
        )
        for i in range(3)
    ]
    files = [photo, photo, tmp_path / "gone.png"]  # the last file has vanished: a grey tile
    untitled = contact_sheet(hits, files, tile_size=128, columns=3)
    titled = contact_sheet(hits, files, tile_size=128, columns=3, query="a red star")
    assert titled.height > untitled.height and titled.width == untitled.width
    pixels = np.asarray(untitled).astype(int)
    # in the first tile, the photo's corner (outside the region) is dimmed; the grey tile is not
    scale = 128 / 80
    corner = pixels[6 + 2, 6 + 2]
    centre = pixels[6 + round(25 * scale), 6 + round(40 * scale)]
    assert np.abs(corner - np.array([200, 150, 100]) * DIM).max() <= 3, corner
    assert np.abs(centre - np.array([200, 150, 100])).max() <= 3, centre
    grey = pixels[6 + 40, 6 + 2 * (128 + 6) + 40]
    assert (grey == 200).all(), grey
    with pytest.raises(ValueError, match="nothing to draw"):
        contact_sheet([], [])


def test_erode_matches_scipy_square_erosion():
    from scipy.ndimage import binary_erosion

    from regionsearch.search.render import erode

    rng = np.random.default_rng(1)
    mask = np.zeros((40, 50), bool)
    mask[5:35, 8:45] = True
    mask |= rng.random((40, 50)) > 0.9
    mask[20:23, 20:23] = False
    for radius in (1, 2, 4):
        expected = binary_erosion(mask, np.ones((2 * radius + 1,) * 2), border_value=1)
        assert np.array_equal(erode(mask, radius), expected), radius
