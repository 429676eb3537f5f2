"""Pairwise mask overlaps of the regions of the images a search touches, computed once per image.

Three result switches compare a region with the other regions of its image: the superset rule
(the share of one region inside another), near-duplicate suppression (their IoU) and the
repeated-stuff term (which regions barely touch). All follow from one matrix of pixel
intersections ``|a & b|`` over the image's regions, which pycocotools gives in one call.
:class:`ImageMasks` holds it for one image (with the repetition scores computed from it), and a
searcher keeps recent ones in an :class:`ImageMasksCache`, so an over-fetching search that
re-ranks growing prefixes of its candidates, or the next search over the same images, does not
compute it again. An image indexed again gets new region ids; its stale entry is never served.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from regionsearch.masks.rle import iou_matrix
from regionsearch.store import RegionRecord
from regionsearch.store.models import VectorState


@dataclass
class ImageMasks:
    """The live regions of one image that have a stored vector, and their intersections."""

    ids: np.ndarray  # (n,) region ids
    area: np.ndarray  # (n,) pixels
    inter: np.ndarray  # (n, n) pixels in both regions
    repetition: dict[int, np.ndarray] = field(default_factory=dict)  # by neighbour count

    def __post_init__(self) -> None:
        self.row_of = {int(i): r for r, i in enumerate(self.ids.tolist())}

    @classmethod
    def from_records(cls, records: Sequence[RegionRecord]) -> ImageMasks:
        area = np.asarray([float(r.area) for r in records])
        rles = [r.rle for r in records]
        inside = iou_matrix(rles, rles, crowd_b=[True] * len(rles))  # [a, b] = |a & b| / |a|
        ids = np.asarray([r.id for r in records], dtype=np.int64)
        return cls(ids, area, inside * area[:, None])

    def holds(self, region_ids: Iterable[int]) -> bool:
        return all(int(i) in self.row_of for i in region_ids)

    def rows(self, region_ids: Iterable[int]) -> np.ndarray:
        return np.asarray([self.row_of[int(i)] for i in region_ids], dtype=np.int64)

    def cover(self, rows: np.ndarray | None = None) -> np.ndarray:
        """``[a, b]`` = share of region ``b``'s pixels inside region ``a`` (as
        :func:`~regionsearch.search.postprocess.mask_cover`), over ``rows`` (default: all)."""
        rows = np.arange(len(self.ids)) if rows is None else rows
        return self.inter[np.ix_(rows, rows)] / np.maximum(self.area[rows][None, :], 1e-12)

    def iou(self, rows: np.ndarray) -> np.ndarray:
        """Pairwise mask IoU over ``rows``."""
        inter = self.inter[np.ix_(rows, rows)]
        union = self.area[rows][:, None] + self.area[rows][None, :] - inter
        return inter / np.maximum(union, 1e-12)


class ImageMasksCache:
    """Recently used :class:`ImageMasks` by image id (bounded LRU; thread-safe, since a
    server's requests share one searcher)."""

    def __init__(self, max_images: int = 20_000) -> None:
        self.max_images = max_images
        self._entries: OrderedDict[int, ImageMasks] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, image_id: int, region_ids: Iterable[int]) -> ImageMasks | None:
        """The entry of ``image_id`` if it knows every one of ``region_ids``, else ``None``."""
        with self._lock:
            entry = self._entries.get(image_id)
            if entry is None or not entry.holds(region_ids):
                return None
            self._entries.move_to_end(image_id)
            return entry

    def put(self, image_id: int, entry: ImageMasks) -> None:
        with self._lock:
            self._entries[image_id] = entry
            self._entries.move_to_end(image_id)
            while len(self._entries) > self.max_images:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


class MaskRelations:
    """The :class:`ImageMasks` of the images one search touches: from ``cache``, or read from
    ``index`` (all their regions, two SQL reads for any number of images)."""

    def __init__(self, index: Any, cache: ImageMasksCache | None = None) -> None:
        self.index = index
        self.cache = cache if cache is not None else ImageMasksCache()

    def of(self, records: Sequence[RegionRecord]) -> dict[int, ImageMasks]:
        """The entries of the images of ``records``, by image id, each holding its records."""
        asked: dict[int, list[int]] = defaultdict(list)
        for r in records:
            asked[r.image_id].append(r.id)
        out: dict[int, ImageMasks] = {}
        for image, ids in asked.items():
            entry = self.cache.get(image, ids)
            if entry is not None:
                out[image] = entry
        missing = [image for image in asked if image not in out]
        if missing:
            loaded = self._load(missing)
            for image in missing:
                entry = loaded.get(image)
                if entry is None or not entry.holds(asked[image]):  # not stored: these only
                    entry = ImageMasks.from_records([r for r in records if r.image_id == image])
                else:
                    self.cache.put(image, entry)
                out[image] = entry
        return out

    def _load(self, image_ids: list[int]) -> dict[int, ImageMasks]:
        committed = VectorState.COMMITTED.value
        by_image: dict[int, list[RegionRecord]] = defaultdict(list)
        for r in self.index.fetch_regions(self.index.region_ids_for_images(image_ids)):
            if r.vector_state == committed:
                by_image[r.image_id].append(r)
        return {image: ImageMasks.from_records(rows) for image, rows in by_image.items()}

    def cover(self, records: Sequence[RegionRecord]) -> np.ndarray:
        """:meth:`ImageMasks.cover` of ``records`` (all of one image)."""
        entry = self.of(records)[records[0].image_id]
        return entry.cover(entry.rows(r.id for r in records))

    def iou(self, records: Sequence[RegionRecord]) -> np.ndarray:
        """:meth:`ImageMasks.iou` of ``records`` (all of one image)."""
        entry = self.of(records)[records[0].image_id]
        return entry.iou(entry.rows(r.id for r in records))
