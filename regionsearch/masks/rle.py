"""COCO run-length encoding (RLE) helpers, thin wrappers over :mod:`pycocotools.mask`.

Why wrappers at all: pycocotools has three sharp edges that silently corrupt data, and every
caller in regionsearch would otherwise have to remember them:

* it needs Fortran-ordered ``uint8`` input; a C-ordered array is encoded as its transpose;
* ``counts`` comes back as ``bytes``, which cannot go into JSON or a SQL text column;
* ``frPyObjects`` treats any 4-number "polygon" as a bounding box.

All RLE dicts produced here are *compressed* COCO RLE with ``str`` counts::

    {"size": [H, W], "counts": "<COCO compressed string>"}

and always describe the **full image** (never a box crop), so IoU against ground truth and
MaskInversion can use them directly. Functions accepting an RLE also accept ``bytes`` counts
and uncompressed RLE (``counts`` as a list of run lengths, as in COCO crowd annotations).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pycocotools import mask as _coco_mask

RLE = dict[str, Any]
"""A COCO RLE dict: ``{"size": [H, W], "counts": str}``."""

__all__ = [
    "RLE",
    "area",
    "bbox",
    "decode",
    "decode_many",
    "encode",
    "encode_many",
    "from_polygons",
    "iou_matrix",
]


def _check_mask(mask: np.ndarray, what: str = "mask") -> np.ndarray:
    """Validate a single 2-D mask and return it as a Fortran-ordered uint8 array."""
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise ValueError(f"{what} must be a 2-D (H, W) array, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{what} is empty (shape {arr.shape}); cannot encode a 0-pixel image")
    # pycocotools reads memory column-major: a C-ordered array would be encoded transposed.
    return np.asfortranarray(arr != 0, dtype=np.uint8)


def _size_of(rle: Mapping[str, Any]) -> tuple[int, int]:
    size = rle.get("size") if isinstance(rle, Mapping) else None
    if size is None or len(size) != 2:
        raise ValueError(f"not a COCO RLE dict (needs 'size': [H, W] and 'counts'): {rle!r:.80}")
    return int(size[0]), int(size[1])


def _to_coco(rle: Mapping[str, Any]) -> dict[str, Any]:
    """Normalise any accepted RLE form into what pycocotools' C functions expect."""
    height, width = _size_of(rle)
    if "counts" not in rle:
        raise ValueError(f"not a COCO RLE dict (missing 'counts'): {rle!r:.80}")
    counts = rle["counts"]
    if isinstance(counts, str):
        return {"size": [height, width], "counts": counts.encode("ascii")}
    if isinstance(counts, bytes):
        return {"size": [height, width], "counts": counts}
    if isinstance(counts, Sequence | np.ndarray):
        runs = [int(c) for c in counts]
        if sum(runs) != height * width:
            raise ValueError(
                f"uncompressed RLE runs sum to {sum(runs)} pixels but size {height}x{width} "
                f"has {height * width}"
            )
        return _coco_mask.frPyObjects({"size": [height, width], "counts": runs}, height, width)
    raise ValueError(f"RLE 'counts' must be str, bytes or a list of ints, got {type(counts)}")


def _decode(coco: Any) -> np.ndarray:
    # pycocotools' Cython decode trips a NumPy 2 DeprecationWarning (``__array__`` without
    # ``copy``) on every call; it is harmless and would drown real warnings in callers' logs.
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"__array__ implementation", category=DeprecationWarning
        )
        return _coco_mask.decode(coco)


def _to_json(rle: Mapping[str, Any]) -> RLE:
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    return {"size": [int(rle["size"][0]), int(rle["size"][1])], "counts": counts}


def encode(mask: np.ndarray) -> RLE:
    """Encode one full-image mask (H, W) into COCO RLE with ``str`` counts.

    Any dtype is accepted; non-zero pixels are foreground. The memory order of the input
    does not matter (it is converted to Fortran order, which pycocotools requires).
    """
    return _to_json(_coco_mask.encode(_check_mask(mask)))


def encode_many(masks: np.ndarray | Sequence[np.ndarray]) -> list[RLE]:
    """Encode a batch of same-sized masks: an (N, H, W) array or a sequence of (H, W) arrays.

    One C call for the whole batch, which is much faster than calling :func:`encode` in a loop.
    """
    if isinstance(masks, np.ndarray):
        if masks.ndim != 3:
            raise ValueError(f"masks must be an (N, H, W) array, got shape {masks.shape}")
        stack = masks
    else:
        if len(masks) == 0:
            raise ValueError("encode_many() got no masks")
        shapes = {np.shape(m) for m in masks}
        if len(shapes) != 1:
            raise ValueError(f"all masks must have the same shape, got {sorted(shapes)}")
        for i, m in enumerate(masks):
            if np.ndim(m) != 2:
                raise ValueError(f"masks[{i}] must be 2-D (H, W), got shape {np.shape(m)}")
        stack = np.stack([np.asarray(m) for m in masks])
    if stack.shape[0] == 0:
        raise ValueError("encode_many() got no masks")
    if stack.shape[1] == 0 or stack.shape[2] == 0:
        raise ValueError(f"masks are empty (shape {stack.shape}); cannot encode 0-pixel images")
    # (N, H, W) -> (H, W, N) Fortran: each mask is then a contiguous column-major block.
    fortran = np.asfortranarray(np.moveaxis(stack != 0, 0, -1), dtype=np.uint8)
    return [_to_json(r) for r in _coco_mask.encode(fortran)]


def decode(rle: Mapping[str, Any]) -> np.ndarray:
    """Decode one RLE (compressed str/bytes or uncompressed list counts) to a bool (H, W) mask."""
    return np.ascontiguousarray(_decode(_to_coco(rle)), dtype=bool)


def decode_many(rles: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """Decode same-sized RLEs to a bool (N, H, W) array."""
    if len(rles) == 0:
        raise ValueError("decode_many() got no RLEs (the output size would be unknown)")
    sizes = {_size_of(r) for r in rles}
    if len(sizes) != 1:
        raise ValueError(f"all RLEs must have the same size, got {sorted(sizes)}")
    stacked = _decode([_to_coco(r) for r in rles])  # (H, W, N)
    return np.ascontiguousarray(np.moveaxis(stacked, -1, 0), dtype=bool)


def area(rle: Mapping[str, Any]) -> int:
    """Number of foreground pixels."""
    return int(_coco_mask.area(_to_coco(rle)))


def bbox(rle: Mapping[str, Any]) -> list[int]:
    """Tight box ``[x, y, w, h]`` in pixels (COCO convention: x/y = left/top column/row).

    Returned as ints: boxes of pixel masks are always whole pixels (pycocotools gives the same
    values as floats). An empty mask gives ``[0, 0, 0, 0]``.
    """
    return [int(v) for v in _coco_mask.toBbox(_to_coco(rle))]


def _as_rles(masks: Any, what: str) -> list[dict[str, Any]]:
    if isinstance(masks, np.ndarray):
        if masks.ndim == 2:
            masks = masks[None]
        if masks.ndim != 3:
            raise ValueError(f"{what} must be (N, H, W) masks or a list of RLEs, got {masks.shape}")
        return [] if masks.shape[0] == 0 else [_to_coco(r) for r in encode_many(masks)]
    items = list(masks)
    if items and all(isinstance(m, np.ndarray) for m in items):
        return [_to_coco(r) for r in encode_many(items)]
    if not all(isinstance(m, Mapping) for m in items):
        raise ValueError(f"{what} must be all RLE dicts or all numpy masks")
    return [_to_coco(r) for r in items]


def iou_matrix(
    masks_a: Sequence[Mapping[str, Any]] | Sequence[np.ndarray] | np.ndarray,
    masks_b: Sequence[Mapping[str, Any]] | Sequence[np.ndarray] | np.ndarray,
    crowd_b: Sequence[bool] | None = None,
) -> np.ndarray:
    """Pairwise mask IoU, shape ``(len(masks_a), len(masks_b))``, computed by pycocotools on RLE.

    Inputs are RLE dicts or boolean masks ((N, H, W) array or list of (H, W)); all must have the
    same image size. ``crowd_b[j]`` true uses COCO's crowd rule for column j (intersection over
    the area of the ``masks_a`` region). An empty side gives a ``(n, 0)``/``(0, m)`` array
    rather than an error because "no proposals for this image" is a normal case in evaluation.
    """
    a = _as_rles(masks_a, "masks_a")
    b = _as_rles(masks_b, "masks_b")
    if crowd_b is not None and len(crowd_b) != len(b):
        raise ValueError(f"crowd_b has {len(crowd_b)} flags for {len(b)} masks")
    if not a or not b:
        return np.zeros((len(a), len(b)), dtype=np.float64)
    sizes = {_size_of(r) for r in a + b}
    if len(sizes) != 1:
        raise ValueError(f"all masks must have the same image size, got {sorted(sizes)}")
    flags = [int(bool(c)) for c in crowd_b] if crowd_b is not None else [0] * len(b)
    return np.asarray(_coco_mask.iou(a, b, flags), dtype=np.float64).reshape(len(a), len(b))


def from_polygons(polygons: Any, height: int, width: int) -> RLE:
    """Rasterise one COCO ``segmentation`` field into a full-image RLE with str counts.

    Accepts what COCO annotations contain: a list of polygons ``[[x1, y1, x2, y2, ...], ...]``
    (the parts of one object, merged into one mask), an uncompressed RLE (crowd annotations,
    ``counts`` a list) or an already compressed RLE. Polygons with fewer than 3 points are
    dropped: pycocotools would otherwise read a 4-number polygon as a bounding box.
    """
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if isinstance(polygons, Mapping):
        if _size_of(polygons) != (height, width):
            raise ValueError(
                f"RLE size {_size_of(polygons)} does not match image size {(height, width)}"
            )
        return _to_json(_to_coco(polygons))
    if not isinstance(polygons, Sequence) or isinstance(polygons, str) or len(polygons) == 0:
        raise ValueError("polygons must be a non-empty list of [x1, y1, x2, y2, ...] lists")
    if all(isinstance(v, int | float) for v in polygons):
        raise ValueError("polygons must be a list of polygons (got one flat list; wrap it in [])")
    kept: list[list[float]] = []
    for i, poly in enumerate(polygons):
        coords = [float(v) for v in poly]
        if len(coords) % 2:
            raise ValueError(f"polygon {i} has an odd number of coordinates ({len(coords)})")
        if len(coords) >= 6:
            kept.append(coords)
    if not kept:
        return encode(np.zeros((height, width), dtype=bool))
    parts = _coco_mask.frPyObjects(kept, height, width)
    return _to_json(_coco_mask.merge(parts))
