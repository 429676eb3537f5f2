"""Where region masks come from: ground-truth COCO annotations, PNG files, or a generator.

Every source answers the same question — "which regions does this photo have?" — with
full-image boolean masks (never box crops), so the indexer can embed and store them without
knowing where they came from.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from regionsearch.image_io import displayed_size, read_rgb
from regionsearch.masks import rle as _rle

__all__ = [
    "SOURCE_KINDS",
    "CocoAnnotationSource",
    "MaskSource",
    "PngMaskSource",
    "RegionProposal",
    "as_rgb",
]

SOURCE_KINDS = ("proposal", "coco", "png", "sam", "sam2", "full-image")
"""Allowed values of :attr:`RegionProposal.source` (stored in the database as-is)."""


@dataclass(eq=False)
class RegionProposal:
    """One candidate region of one image.

    ``mask`` is a full-image (H, W) bool array; ``score`` orders proposals of one image (higher
    is better, 1.0 for ground truth); ``category`` and ``annotation_id`` are only known for
    annotated sources and let evaluation trace a region back to its annotation.
    """

    mask: np.ndarray
    source: str
    score: float = 1.0
    category: str | None = None
    annotation_id: int | None = None

    def __post_init__(self) -> None:
        mask = np.asarray(self.mask)
        if mask.ndim != 2:
            raise ValueError(f"RegionProposal.mask must be 2-D (H, W), got shape {mask.shape}")
        self.mask = mask if mask.dtype == bool else mask != 0
        if self.source not in SOURCE_KINDS:
            raise ValueError(f"unknown source {self.source!r}; expected one of {SOURCE_KINDS}")
        self.score = float(self.score)

    @property
    def area(self) -> int:
        """Foreground pixel count."""
        return int(self.mask.sum())

    def to_rle(self) -> _rle.RLE:
        """Full-image COCO RLE with str counts, ready for JSON/SQL."""
        return _rle.encode(self.mask)


class ImageProposer:
    """Base of the sources that propose masks from the pixels alone (automatic, SAM, SAM 2)."""

    def masks_for(self, image_path: Path, image: np.ndarray | None = None) -> list[RegionProposal]:
        """Proposals for an image (decoded from ``image_path`` only if ``image`` is None, as the
        indexer decodes it: EXIF orientation applied, high bit depths scaled)."""
        if image is None:
            image = read_rgb(image_path)
        return self.propose(image)

    def propose(self, image: np.ndarray) -> list[RegionProposal]:
        """Proposals for an (H, W[, C]) image."""
        raise NotImplementedError


@runtime_checkable
class MaskSource(Protocol):
    """Anything that lists the regions of an image.

    ``image`` is the decoded (H, W, 3) uint8 photo the caller already has in memory; sources
    use it for the image size (and generators for the pixels), so nothing is decoded twice.
    """

    def masks_for(self, image_path: Path, image: np.ndarray) -> list[RegionProposal]: ...


def as_rgb(image: np.ndarray) -> np.ndarray:
    """The photo as a contiguous (H, W, 3) uint8 array, the input every generator expects.

    Grey is repeated to three channels, alpha dropped, floats in [0, 1] scaled to 0..255.
    """
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ValueError(f"image must be (H, W), (H, W, 3) or (H, W, 4), got shape {arr.shape}")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"image is empty (shape {arr.shape})")
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and arr.max(initial=0) <= 1.0:
            arr = arr * 255.0
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr)


def _image_hw(image_path: Path, image: np.ndarray | None) -> tuple[int, int]:
    if image is not None:
        arr = np.asarray(image)
        if arr.ndim not in (2, 3):
            raise ValueError(f"image must be (H, W) or (H, W, C), got shape {arr.shape}")
        return int(arr.shape[0]), int(arr.shape[1])
    width, height = displayed_size(image_path)
    return height, width


#: Keys every entry of each section of a COCO instances file must have (sizes may be missing).
_REQUIRED_KEYS: dict[str, tuple[str, ...]] = {
    "categories": ("id", "name"),
    "images": ("id", "file_name"),
    "annotations": ("id", "image_id", "category_id"),
}


def check_coco_entries(coco: dict[str, Any], path: Path) -> None:
    """Raise one clear ``ValueError`` for the first malformed entry or a repeated image id (not
    a ``KeyError`` later, nor an image read twice); shared by ``index`` and ``eval``."""
    for section, keys in _REQUIRED_KEYS.items():
        for k, entry in enumerate(coco[section]):
            missing = [key for key in keys if not isinstance(entry, dict) or key not in entry]
            if missing:
                raise ValueError(
                    f"{path}: {section} entry #{k} has no {', '.join(map(repr, missing))} "
                    f"(COCO needs {', '.join(keys)} in every {section} entry)"
                )
    seen: set[int] = set()
    for img in coco["images"]:
        if int(img["id"]) in seen:
            raise ValueError(f"{path}: image id {img['id']} appears twice in 'images'")
        seen.add(int(img["id"]))


class CocoAnnotationSource:
    """Ground-truth masks from a COCO *instances* JSON (polygons, RLE and crowd RLE).

    Images are looked up by file name (``image_path.name``, or the full ``file_name`` as written
    in the JSON) or by COCO image id. Masks come in annotation order, with category names.
    Crowd regions (one mask covering many objects) are included unless ``include_crowd=False``.
    """

    def __init__(self, annotation_file: str | Path, include_crowd: bool = True) -> None:
        path = Path(annotation_file)
        if not path.is_file():
            raise FileNotFoundError(f"COCO annotation file not found: {path}")
        try:
            with path.open(encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path} is not a JSON file: {exc}") from exc
        if not isinstance(data, dict) or not all(
            isinstance(data.get(k), list) for k in ("images", "annotations", "categories")
        ):
            raise ValueError(
                f"{path} is not a COCO instances file (needs 'images', 'annotations' and "
                "'categories' lists)"
            )
        check_coco_entries(data, path)
        self.path = path
        self.include_crowd = include_crowd
        self.categories: dict[int, str] = {int(c["id"]): str(c["name"]) for c in data["categories"]}
        self._images: dict[int, dict[str, Any]] = {int(im["id"]): im for im in data["images"]}
        self._by_name: dict[str, int] = {}
        basenames: dict[str, list[int]] = {}
        for image_id, im in self._images.items():
            self._by_name[str(im["file_name"])] = image_id
            basenames.setdefault(Path(str(im["file_name"])).name, []).append(image_id)
        for name, ids in basenames.items():
            if len(ids) == 1:  # an ambiguous bare name must be looked up by its full file_name
                self._by_name.setdefault(name, ids[0])
        self._anns: dict[int, list[dict[str, Any]]] = {i: [] for i in self._images}
        for ann in data["annotations"]:
            if "segmentation" not in ann or int(ann["image_id"]) not in self._anns:
                raise ValueError(
                    f"{path}: annotation {ann.get('id')!r} has no segmentation or an unknown "
                    f"image_id {ann.get('image_id')!r}"
                )
            self._anns[int(ann["image_id"])].append(ann)

    @property
    def file_names(self) -> list[str]:
        """File names of all images in the annotation file, in file order."""
        return [str(im["file_name"]) for im in self._images.values()]

    def image_id(self, file_name: str | Path) -> int:
        """COCO image id for a file name; ``KeyError`` if the file is not annotated here."""
        name = str(file_name)
        for key in (name, Path(name).name):
            if key in self._by_name:
                return self._by_name[key]
        raise KeyError(f"image {name!r} is not listed in {self.path}")

    def masks_for_id(
        self, image_id: int, image_hw: tuple[int, int] | None = None
    ) -> list[RegionProposal]:
        """All (non-crowd, unless ``include_crowd``) instance masks of one image.

        ``image_hw`` is the photo's size, used where the file's ``images`` entry has none.
        """
        if image_id not in self._images:
            raise KeyError(f"image id {image_id} is not listed in {self.path}")
        size = self._size(image_id) or image_hw
        if size is None:
            raise ValueError(
                f"{self.path} gives no height/width for image id {image_id}; pass the image"
            )
        height, width = size
        out: list[RegionProposal] = []
        for ann in self._anns[image_id]:
            if ann.get("iscrowd", 0) and not self.include_crowd:
                continue
            mask = _rle.decode(_rle.from_polygons(ann["segmentation"], height, width))
            out.append(
                RegionProposal(
                    mask=mask,
                    source="coco",
                    score=1.0,
                    category=self.categories.get(int(ann["category_id"])),
                    annotation_id=int(ann["id"]),
                )
            )
        return out

    def masks_for(self, image_path: Path, image: np.ndarray | None = None) -> list[RegionProposal]:
        """Masks of the image named ``image_path.name``; checks the size against ``image``."""
        image_id = self.image_id(Path(image_path).name)
        got = _image_hw(Path(image_path), image) if image is not None else None
        expected = self._size(image_id)
        if got is not None and expected is not None and got != expected:
            raise ValueError(
                f"{image_path}: image is {got[1]}x{got[0]} (WxH) but {self.path} says "
                f"{expected[1]}x{expected[0]}"
            )
        return self.masks_for_id(image_id, got)

    def _size(self, image_id: int) -> tuple[int, int] | None:
        """(height, width) the file gives for an image, or ``None`` where it leaves them out."""
        im = self._images[image_id]
        if im.get("height") is None or im.get("width") is None:
            return None
        return int(im["height"]), int(im["width"])


class PngMaskSource:
    """Masks stored as PNG files next to (not inside) the photo folder.

    Two layouts are supported, and both are read if both exist for an image:

    * ``<folder>/<image stem>/*.png`` — one binary mask per file (any non-zero pixel is
      foreground), read in file-name order; all-zero files are skipped.
    * ``<folder>/<image stem>.png`` — one *label image*: every distinct non-zero value is one
      instance (grey/16-bit/palette index, or distinct colour for RGB), in ascending value order.
      ``annotation_id`` is then the label value.

    Every PNG must have exactly the photo's size: masks are never resized, since a silently
    rescaled mask would be stored and evaluated against the wrong pixels.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise FileNotFoundError(f"mask folder not found: {self.folder}")

    def masks_for(self, image_path: Path, image: np.ndarray | None = None) -> list[RegionProposal]:
        """Masks for ``image_path`` (looked up by its stem); empty list if there are none."""
        image_path = Path(image_path)
        hw = _image_hw(image_path, image)
        stem = image_path.stem
        out: list[RegionProposal] = []
        per_instance = self.folder / stem
        if per_instance.is_dir():
            for png in _pngs(per_instance.iterdir()):
                arr = self._load(png, hw)
                mask = arr.any(axis=-1) if arr.ndim == 3 else arr != 0
                if mask.any():
                    out.append(RegionProposal(mask=mask, source="png", score=1.0))
        for label_file in _pngs(self.folder / f"{stem}{ext}" for ext in (".png", ".PNG")):
            out.extend(self._instances(label_file, hw))
            break  # on case-insensitive file systems both names are the same file
        return out

    @staticmethod
    def _load(png: Path, hw: tuple[int, int]) -> np.ndarray:
        with Image.open(png) as im:
            if im.mode in ("RGBA", "LA", "PA"):  # transparency is not a label: drop alpha
                im = im.convert("RGB" if im.mode == "RGBA" else "L")
            arr = np.asarray(im)
        if arr.shape[:2] != hw:
            raise ValueError(
                f"mask {png} is {arr.shape[1]}x{arr.shape[0]} (WxH) but its image is "
                f"{hw[1]}x{hw[0]}"
            )
        return arr

    def _instances(self, png: Path, hw: tuple[int, int]) -> list[RegionProposal]:
        arr = self._load(png, hw)
        if arr.ndim == 3:  # colour-coded instances: pack RGB into one integer label
            arr = arr.astype(np.int64)
            arr = (arr[..., 0] << 16) | (arr[..., 1] << 8) | arr[..., 2]
        labels = np.unique(arr)
        return [
            RegionProposal(mask=arr == v, source="png", score=1.0, annotation_id=int(v))
            for v in labels
            if v != 0
        ]


def _pngs(paths: Iterable[Path]) -> list[Path]:
    return sorted(p for p in paths if p.is_file() and p.suffix.lower() == ".png")
