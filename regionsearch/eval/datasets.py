"""Ground-truth regions of a COCO-format dataset, image by image, for the region benchmarks.

Any dataset in COCO instance format works: real COCO, RefCOCO (COCO ``instances.json`` plus a
list of refs), the synthetic world (``regionsearch world generate``). Everything the tasks need
per image comes out of :class:`RegionDataset` in one :class:`ImageRegions` record, so the runner
never touches JSON or pycocotools.

Which annotations become masks (the rule, applied in this order):

1. ``iscrowd=1`` annotations are skipped: a crowd region covers a group of objects ("people in
   a stand"), is not one instance, and COCO's own evaluation ignores it.
2. The ``segmentation`` (polygons, compressed or uncompressed RLE) is rasterised at the image's
   size from the ``images`` entry; an annotation without a segmentation is skipped.
3. Masks with fewer than ``min_area`` foreground pixels (default 16, i.e. smaller than 4x4) are
   skipped: empty ones (degenerate polygons) cannot be embedded at all, and specks that vanish
   below one pixel at the ViT's input size would be scored on noise.

Images left with no mask are not yielded. Expressions attached to a skipped annotation are
dropped with it.

Expression files, both accepted (auto-detected per entry):

* world format: ``[{"ann_id", "image_id", "sentences": ["the red circle", ...]}, ...]``;
* RefCOCO refs (converted from ``refs(unc).p`` to JSON): ``[{"ref_id", "ann_id", "image_id",
  "split", "sentences": [{"sent": "...", ...}, ...]}, ...]``; several refs of one annotation
  are merged. A top-level ``{"refs": [...]}`` or ``{"expressions": [...]}`` wrapper is accepted.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from regionsearch.errors import RegionSearchError
from regionsearch.image_io import ImageDecodeError, decode_bytes, displayed_size
from regionsearch.masks import rle as rle_utils
from regionsearch.masks.sources import check_coco_entries

LOG = logging.getLogger(__name__)

#: Masks with fewer foreground pixels than this are skipped (see the module docstring).
DEFAULT_MIN_AREA = 16


class EvalError(RegionSearchError, ValueError):
    """An evaluation cannot run as asked (bad task or embedder name, missing inputs)."""


class DatasetError(EvalError):
    """A dataset cannot be read: missing files, malformed JSON, or no usable masks."""


@dataclass
class ImageRegions:
    """One image with its ground-truth regions, as every benchmark task consumes it.

    Attributes:
        image_id: the COCO image id.
        file_name: path of the image file relative to the images folder.
        image: ``(H, W, 3)`` uint8 RGB, EXIF orientation applied.
        masks: ``(M, H, W)`` bool, one full-image mask per kept annotation.
        ann_ids: ``M`` annotation ids, in the order of ``masks``.
        labels: ``M`` class indices into :attr:`RegionDataset.class_names`.
        expressions: ``M`` lists of sentences (empty where an annotation has none).
    """

    image_id: int
    file_name: str
    image: np.ndarray
    masks: np.ndarray
    ann_ids: list[int]
    labels: list[int]
    expressions: list[list[str]] = field(default_factory=list)

    @property
    def num_masks(self) -> int:
        return len(self.ann_ids)


def category_name(name: str) -> str:
    """Class text of a COCO category name: underscores become spaces (``traffic_light``)."""
    return " ".join(name.replace("_", " ").split())


#: Basic colour terms a category name may start with ("red star", "light_blue ring" does not).
COLOUR_WORDS = frozenset(
    [
        "red",
        "orange",
        "yellow",
        "green",
        "blue",
        "purple",
        "violet",
        "pink",
        "brown",
        "black",
        "white",
        "grey",
        "gray",
        "cyan",
        "magenta",
        "teal",
        "navy",
        "gold",
        "silver",
        "beige",
        "maroon",
        "olive",
        "lime",
        "turquoise",
    ]
)


def category_colour(category: dict[str, Any]) -> str | None:
    """The colour of a category, for the colour-ambiguous split of the evaluation.

    Its ``colour`` (or ``color``) field when it has one (``regionsearch world generate`` writes
    it), else the first word of a name of two or more words when that word is a basic colour
    term ("red star" from another generator), else ``None`` (COCO's "orange" is a fruit).
    """
    for key in ("colour", "color"):
        if isinstance(category.get(key), str):
            return category[key]
    words = category_name(str(category.get("name", ""))).lower().split()
    return words[0] if len(words) >= 2 and words[0] in COLOUR_WORDS else None


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise DatasetError(f"{what} file not found: {path}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{what} file {path} is not valid JSON: {exc}") from exc


def _sentence_text(sentence: Any) -> str | None:
    """A sentence as text: a plain string, or RefCOCO's ``{"sent": ..., "raw": ...}`` dict."""
    if isinstance(sentence, str):
        text = sentence
    elif isinstance(sentence, dict):
        text = sentence.get("sent") or sentence.get("raw") or ""
    else:
        return None
    text = " ".join(str(text).split())
    return text or None


def load_expressions(path: Path, split: str | None = None) -> dict[int, list[str]]:
    """Sentences per annotation id from a world-format or RefCOCO-style expression file.

    ``split`` keeps only RefCOCO refs of that split (``"val"``, ``"testA"``, ...); entries
    without a ``split`` field are always kept. Duplicate sentences of one annotation are kept
    once, in first-seen order.
    """
    data = _read_json(path, "expressions")
    if isinstance(data, dict):
        data = data.get("refs", data.get("expressions"))
    if not isinstance(data, list):
        raise DatasetError(
            f"expressions file {path} must hold a list of "
            "{ann_id, image_id, sentences} entries (world or RefCOCO refs format)"
        )
    out: dict[int, list[str]] = defaultdict(list)
    for i, entry in enumerate(data):
        if not isinstance(entry, dict) or "ann_id" not in entry or "sentences" not in entry:
            raise DatasetError(
                f"expressions file {path}: entry {i} lacks 'ann_id' or 'sentences': {entry!r:.120}"
            )
        if split is not None and entry.get("split", split) != split:
            continue
        sentences = out[int(entry["ann_id"])]
        for sentence in entry["sentences"]:
            text = _sentence_text(sentence)
            if text is not None and text not in sentences:
                sentences.append(text)
    return {k: v for k, v in out.items() if v}


@dataclass
class _Entry:
    """What the index keeps per image before any pixel is read."""

    image_id: int
    file_name: str
    height: int | None  # None: not in the annotation file, read from the image header
    width: int | None
    annotations: list[dict[str, Any]]


class RegionDataset:
    """Images of a COCO-format dataset with their ground-truth masks, labels and expressions.

    Only the JSON is read at construction (cheap, and errors surface before any model loads);
    images and masks are decoded lazily while iterating.

    Args:
        images: folder the ``file_name`` entries are relative to.
        annotations: COCO instances JSON.
        expressions: optional expression file (world or RefCOCO refs format, see module doc).
        limit: keep only the first ``limit`` usable images (in the JSON's ``images`` order).
        min_area: smallest mask kept, in pixels (see module docstring).
        require_expressions: keep only images with at least one expression (for
            expression-only runs on RefCOCO, whose ``instances.json`` covers far more images
            than its refs).
        split: RefCOCO split to keep from the expression file.
        name: label of the dataset in result rows (default: the annotation file's stem).
    """

    def __init__(
        self,
        images: str | Path,
        annotations: str | Path,
        expressions: str | Path | None = None,
        *,
        limit: int | None = None,
        min_area: int = DEFAULT_MIN_AREA,
        require_expressions: bool = False,
        split: str | None = None,
        name: str | None = None,
    ) -> None:
        self.images_dir = Path(images)
        self.annotations_path = Path(annotations)
        self.expressions_path = Path(expressions) if expressions is not None else None
        if not self.images_dir.is_dir():
            raise DatasetError(f"images folder not found: {self.images_dir}")
        if limit is not None and limit < 1:
            raise DatasetError(f"--limit must be at least 1, got {limit}")
        self.min_area = int(min_area)
        self.name = name or self.annotations_path.stem

        coco = _read_json(self.annotations_path, "annotations")
        if not isinstance(coco, dict) or not {"images", "annotations", "categories"} <= set(coco):
            raise DatasetError(
                f"{self.annotations_path} is not a COCO instances file "
                "(needs 'images', 'annotations' and 'categories')"
            )
        try:
            check_coco_entries(coco, self.annotations_path)
        except ValueError as exc:
            raise DatasetError(str(exc)) from None
        categories = sorted(coco["categories"], key=lambda c: int(c["id"]))
        #: Class texts, one per category in id order (underscores replaced by spaces).
        self.class_names: list[str] = [category_name(c["name"]) for c in categories]
        self.category_index: dict[int, int] = {int(c["id"]): i for i, c in enumerate(categories)}
        #: Colour of each class where a category gives one (see :func:`category_colour`), else
        #: ``None``: lets the evaluation score colour-ambiguous masks separately.
        self.class_colours: list[str | None] = [category_colour(c) for c in categories]
        self.sentences: dict[int, list[str]] = (
            load_expressions(self.expressions_path, split) if self.expressions_path else {}
        )

        by_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
        self.skipped: dict[str, int] = {"crowd": 0, "no_segmentation": 0, "unknown_category": 0}
        for ann in coco["annotations"]:
            if ann.get("iscrowd", 0):
                self.skipped["crowd"] += 1
            elif not ann.get("segmentation"):
                self.skipped["no_segmentation"] += 1
            elif int(ann["category_id"]) not in self.category_index:
                self.skipped["unknown_category"] += 1
            else:
                by_image[int(ann["image_id"])].append(ann)

        self._entries: list[_Entry] = []
        for img in coco["images"]:
            anns = by_image.get(int(img["id"]), [])
            if require_expressions:
                anns_with = [a for a in anns if int(a["id"]) in self.sentences]
                if not anns_with:
                    continue
            if not anns:
                continue
            size = [int(img[k]) if img.get(k) is not None else None for k in ("height", "width")]
            self._entries.append(_Entry(int(img["id"]), img["file_name"], *size, anns))
            if limit is not None and len(self._entries) >= limit:
                break
        self._check_files_exist()
        self._read_missing_sizes()
        if not self._entries:
            what = "expressions" if require_expressions else "non-crowd segmentation masks"
            raise DatasetError(
                f"no image of {self.annotations_path} has {what} "
                f"(skipped: {self.skipped}); is this an instances file with segmentations?"
            )

    def _check_files_exist(self) -> None:
        """Fail before any model runs when annotated images are missing (a wrong ``--images``
        folder, an incomplete download), naming a few of them, instead of hours into a run."""
        missing = [
            e.file_name for e in self._entries if not (self.images_dir / e.file_name).is_file()
        ]
        if missing:
            shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
            raise DatasetError(
                f"{len(missing)} of the {len(self._entries)} annotated images are not in "
                f"{self.images_dir} ({shown}); is it the folder the annotations' file_name "
                "entries are relative to?"
            )

    def _read_missing_sizes(self) -> None:
        """Images whose entry leaves out ``height``/``width`` get their displayed size."""
        for entry in self._entries:
            if entry.height is None or entry.width is None:
                try:
                    entry.width, entry.height = displayed_size(self.images_dir / entry.file_name)
                except ImageDecodeError as exc:
                    raise DatasetError(f"{exc} (image id {entry.image_id})") from None

    def __len__(self) -> int:
        """Images with at least one candidate annotation (a few may still lose all masks to
        ``min_area`` while decoding; those are not yielded)."""
        return len(self._entries)

    @property
    def num_annotations(self) -> int:
        """Candidate annotations of the selected images (before the ``min_area`` rule)."""
        return sum(len(e.annotations) for e in self._entries)

    def load_image(self, entry: _Entry) -> np.ndarray:
        """RGB pixels of ``entry``, decoded exactly as ``regionsearch index`` decodes them.

        The indexer's decoder (EXIF orientation, 16-bit images scaled rather than clipped,
        transparency on white) keeps the mask tasks and the search task on the same pixels.
        COCO annotations are drawn on the image as displayed. If the transposed image does not
        have the annotated size but the raw one does (a few datasets annotate raw pixels), the
        raw orientation is used; if neither matches, the masks cannot be placed and it raises.
        """
        path = self.images_dir / entry.file_name
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise DatasetError(f"image {path} cannot be read: {exc.strerror or exc}") from None
        shapes = []
        for exif_transpose in (True, False):
            try:
                pixels = decode_bytes(data, name=str(path), exif_transpose=exif_transpose)
            except ImageDecodeError as exc:
                raise DatasetError(f"{exc} (image id {entry.image_id})") from None
            if pixels.shape[:2] == (entry.height, entry.width):
                return pixels
            shapes.append(pixels.shape)
        raise DatasetError(
            f"image {path} is {shapes[0][1]}x{shapes[0][0]} but its annotations are "
            f"for {entry.width}x{entry.height}"
        )

    def decode_masks(self, entry: _Entry) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """Full-image boolean masks of ``entry``'s annotations that pass ``min_area``."""
        masks, kept = [], []
        for ann in entry.annotations:
            try:
                rle = rle_utils.from_polygons(ann["segmentation"], entry.height, entry.width)
                mask = rle_utils.decode(rle)
            except ValueError as exc:
                LOG.warning("annotation %s of image %s skipped: %s", ann["id"], entry.image_id, exc)
                continue
            if int(mask.sum()) < self.min_area:
                continue
            masks.append(mask)
            kept.append(ann)
        if not masks:
            return np.zeros((0, entry.height, entry.width), dtype=bool), []
        return np.stack(masks), kept

    def __iter__(self) -> Iterator[ImageRegions]:
        for entry in self._entries:
            masks, anns = self.decode_masks(entry)
            if not anns:
                continue
            ann_ids = [int(a["id"]) for a in anns]
            yield ImageRegions(
                image_id=entry.image_id,
                file_name=entry.file_name,
                image=self.load_image(entry),
                masks=masks,
                ann_ids=ann_ids,
                labels=[self.category_index[int(a["category_id"])] for a in anns],
                expressions=[list(self.sentences.get(i, [])) for i in ann_ids],
            )

    @classmethod
    def from_world(cls, folder: str | Path, **kwargs: Any) -> RegionDataset:
        """A dataset written by ``regionsearch world generate`` (``images/``, ``instances.json``,
        ``expressions.json``)."""
        folder = Path(folder)
        if not (folder / "instances.json").is_file():
            raise DatasetError(
                f"{folder} is not a world dataset (no instances.json): create one with "
                "'regionsearch world generate DIR' or pass --world-generate N"
            )
        expressions = folder / "expressions.json"
        kwargs.setdefault("name", f"world:{folder.name}")
        return cls(
            folder / "images",
            folder / "instances.json",
            expressions if expressions.is_file() else None,
            **kwargs,
        )


def summarize(items: Sequence[ImageRegions]) -> dict[str, int]:
    """Counts of images, masks and sentences, for logs and tests."""
    return {
        "images": len(items),
        "masks": sum(i.num_masks for i in items),
        "sentences": sum(len(s) for i in items for s in i.expressions),
    }


__all__ = [
    "DEFAULT_MIN_AREA",
    "DatasetError",
    "EvalError",
    "ImageRegions",
    "RegionDataset",
    "category_name",
    "load_expressions",
    "summarize",
]
