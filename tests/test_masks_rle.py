"""COCO RLE wrappers: round trips, the Fortran-order pitfall, metrics against numpy."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pycocotools import mask as coco_mask
from skimage.draw import polygon as draw_polygon

from regionsearch.masks import rle


def l_shape() -> np.ndarray:
    """A non-square, non-symmetric mask: transposing or flipping it changes it."""
    m = np.zeros((7, 11), dtype=bool)
    m[1:6, 2] = True  # vertical bar
    m[5, 2:9] = True  # horizontal foot
    m[0, 10] = True  # lone corner pixel
    return m


def np_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def test_encode_decode_round_trip_non_symmetric() -> None:
    m = l_shape()
    encoded = rle.encode(m)
    assert encoded["size"] == [7, 11]
    assert isinstance(encoded["counts"], str)
    decoded = rle.decode(encoded)
    assert decoded.dtype == bool
    assert decoded.shape == m.shape
    np.testing.assert_array_equal(decoded, m)


def test_c_order_input_is_not_encoded_transposed() -> None:
    m = l_shape()
    c_order = np.ascontiguousarray(m)
    f_order = np.asfortranarray(m)
    assert rle.encode(c_order) == rle.encode(f_order)
    # The pitfall being guarded against: raw pycocotools reading a C-ordered buffer as if it
    # were column-major sees the transpose, which for this mask is a different RLE.
    naive = coco_mask.encode(np.asfortranarray(c_order.T.astype(np.uint8)))
    assert naive["counts"].decode() != rle.encode(m)["counts"]


def test_non_bool_input_treats_nonzero_as_foreground() -> None:
    m = l_shape().astype(np.uint8) * 255
    np.testing.assert_array_equal(rle.decode(rle.encode(m)), l_shape())


def test_rle_is_json_serialisable_and_bytes_counts_accepted() -> None:
    encoded = rle.encode(l_shape())
    assert json.loads(json.dumps(encoded)) == encoded
    as_bytes = {"size": encoded["size"], "counts": encoded["counts"].encode()}
    np.testing.assert_array_equal(rle.decode(as_bytes), l_shape())


def test_area_and_bbox_match_numpy() -> None:
    rng = np.random.default_rng(0)
    for _ in range(5):
        m = np.zeros((23, 31), dtype=bool)
        y0, x0 = rng.integers(0, 10, size=2)
        m[y0 : y0 + rng.integers(1, 12), x0 : x0 + rng.integers(1, 20)] = True
        m &= rng.random(m.shape) < 0.8
        m[y0, x0] = True
        encoded = rle.encode(m)
        assert rle.area(encoded) == int(m.sum())
        ys, xs = np.nonzero(m)
        expected = [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
        assert rle.bbox(encoded) == [int(v) for v in expected]
        assert all(isinstance(v, int) for v in rle.bbox(encoded))


def test_empty_mask_area_and_bbox() -> None:
    encoded = rle.encode(np.zeros((4, 6), dtype=bool))
    assert rle.area(encoded) == 0
    assert rle.bbox(encoded) == [0, 0, 0, 0]


def test_encode_many_and_decode_many_round_trip() -> None:
    rng = np.random.default_rng(1)
    stack = rng.random((4, 9, 13)) < 0.4
    encoded = rle.encode_many(stack)
    assert encoded == [rle.encode(m) for m in stack]
    assert rle.encode_many(list(stack)) == encoded
    np.testing.assert_array_equal(rle.decode_many(encoded), stack)


def test_iou_matrix_matches_numpy_reference() -> None:
    rng = np.random.default_rng(2)
    a = rng.random((3, 17, 12)) < 0.5
    b = rng.random((4, 17, 12)) < 0.3
    expected = np.array([[np_iou(x, y) for y in b] for x in a])
    np.testing.assert_allclose(rle.iou_matrix(a, b), expected, atol=1e-9)
    np.testing.assert_allclose(rle.iou_matrix(rle.encode_many(a), list(b)), expected, atol=1e-9)


def test_iou_matrix_crowd_rule_and_empty_side() -> None:
    big = np.zeros((10, 10), dtype=bool)
    big[:, :5] = True
    small = np.zeros((10, 10), dtype=bool)
    small[:2, :2] = True
    # Crowd column: intersection over the area of the row mask (4 / 4), not IoU (4 / 50).
    ious = rle.iou_matrix([small], [big, big], crowd_b=[True, False])
    np.testing.assert_allclose(ious, [[1.0, 4 / 50]])
    assert rle.iou_matrix([], [small]).shape == (0, 1)
    assert rle.iou_matrix(np.zeros((0, 10, 10), bool), [small]).shape == (0, 1)


def test_iou_matrix_rejects_size_mismatch() -> None:
    with pytest.raises(ValueError, match="same image size"):
        rle.iou_matrix([np.ones((4, 4), bool)], [rle.encode(np.ones((4, 5), bool))])


def test_polygon_matches_hand_drawn_reference() -> None:
    height, width = 60, 80
    xs = [10.0, 70.0, 55.0, 20.0]
    ys = [8.0, 15.0, 50.0, 40.0]
    poly = [v for xy in zip(xs, ys, strict=True) for v in xy]
    mask = rle.decode(rle.from_polygons([poly], height, width))
    reference = np.zeros((height, width), dtype=bool)
    rr, cc = draw_polygon(np.array(ys), np.array(xs), shape=(height, width))
    reference[rr, cc] = True
    assert mask.shape == (height, width)
    assert np_iou(mask, reference) > 0.95
    # Orientation check: the polygon's centroid is set, the opposite corners are not.
    assert mask[28, 40] and not mask[55, 5] and not mask[2, 75]


def test_polygon_parts_are_merged_and_degenerate_parts_dropped() -> None:
    left = [1, 1, 5, 1, 5, 5, 1, 5]
    right = [10, 1, 14, 1, 14, 5, 10, 5]
    one = rle.decode(rle.from_polygons([left], 8, 16))
    both = rle.decode(rle.from_polygons([left, right], 8, 16))
    assert both.sum() == 2 * one.sum() > 0
    assert both[3, 12] and not one[3, 12]
    # A 4-number "polygon" would be read as a box by pycocotools; it must be ignored instead.
    with_line = rle.decode(rle.from_polygons([left, [0, 0, 15, 7]], 8, 16))
    np.testing.assert_array_equal(with_line, one)


def test_uncompressed_and_compressed_rle_inputs() -> None:
    m = l_shape()
    runs, current, last = [], 0, False
    for v in m.ravel(order="F"):
        if bool(v) != last:
            runs.append(current)
            current, last = 0, bool(v)
        current += 1
    runs.append(current)
    uncompressed = {"size": [7, 11], "counts": runs}
    assert rle.from_polygons(uncompressed, 7, 11) == rle.encode(m)
    np.testing.assert_array_equal(rle.decode(uncompressed), m)
    assert rle.from_polygons(rle.encode(m), 7, 11) == rle.encode(m)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (np.zeros(5, bool), "2-D"),
        (np.zeros((2, 3, 4), bool), "2-D"),
        (np.zeros((0, 4), bool), "empty"),
    ],
)
def test_encode_rejects_bad_shapes(bad: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        rle.encode(bad)


def test_batch_and_polygon_errors() -> None:
    with pytest.raises(ValueError, match="no masks"):
        rle.encode_many([])
    with pytest.raises(ValueError, match="same shape"):
        rle.encode_many([np.ones((2, 2), bool), np.ones((2, 3), bool)])
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        rle.encode_many(np.ones((2, 2), bool))
    with pytest.raises(ValueError, match="no RLEs"):
        rle.decode_many([])
    with pytest.raises(ValueError, match="same size"):
        rle.decode_many([rle.encode(np.ones((2, 2))), rle.encode(np.ones((3, 2)))])
    with pytest.raises(ValueError, match="odd number"):
        rle.from_polygons([[1, 1, 5, 1, 5]], 8, 8)
    with pytest.raises(ValueError, match="non-empty"):
        rle.from_polygons([], 8, 8)
    with pytest.raises(ValueError, match="flat list"):
        rle.from_polygons([1, 1, 5, 1, 5, 5], 8, 8)
    with pytest.raises(ValueError, match="does not match"):
        rle.from_polygons(rle.encode(np.ones((4, 4))), 8, 8)
    with pytest.raises(ValueError, match="sum to"):
        rle.decode({"size": [2, 2], "counts": [1, 1]})
    with pytest.raises(ValueError, match="not a COCO RLE"):
        rle.decode({"counts": "abc"})
