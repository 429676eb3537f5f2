"""The regions an index of a COCO-format dataset would hold, and how they meet its objects.

:func:`collect` runs the indexer's image preparation (decode + mask source) on every image and
keeps two region sets per dataset: automatic proposals, as ``regionsearch index`` makes them,
and the ground-truth masks (the ceiling). Each :class:`RegionSet` carries what scoring and the
result switches need without decoding a mask again: image, area, IoU with the image's objects
and with the image's other regions. Scoring lives in :mod:`regionsearch.eval.search_task`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from regionsearch.eval.datasets import DatasetError, RegionDataset
from regionsearch.masks import rle as rle_mod
from regionsearch.search.postprocess import repetition_scores


@dataclass
class RegionSet:
    """The regions of every image of a dataset (one source: proposals or ground truth), with
    what scoring needs: which image, which area, and how each overlaps the image's objects."""

    name: str
    rles: list[list[dict[str, Any]]]  # per image, its regions as RLEs (what the index stores)
    image_of: np.ndarray  # (R,) image position of each region
    area: np.ndarray  # (R,) fraction of its image
    overlap: np.ndarray  # (R, G) IoU with the objects of its own image (-1: no such object)
    label_of: np.ndarray  # (R, G) class of those objects (-1: none)
    self_iou: list[np.ndarray] = field(default_factory=list)  # per image, (n_i, n_i)
    local: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # (R,) row in image
    objectness: np.ndarray | None = None  # (R,) the mask source's score (None: ground truth)

    @property
    def size(self) -> int:
        return len(self.image_of)

    def covered(self, iou: float) -> float:
        """Fraction of objects some region overlaps at IoU >= ``iou`` (recall of the set)."""
        found = []
        for i in np.unique(self.image_of):
            rows = self.image_of == i
            objects = self.label_of[rows][0] >= 0
            found.append((self.overlap[rows] >= iou).any(axis=0)[objects])
        return float(np.concatenate(found).mean())

    def pairwise(self, order: np.ndarray) -> Callable[[list[int]], np.ndarray]:
        """``pairwise_iou`` for :func:`greedy_dedupe` over the ranked regions ``order``."""

        def of(positions: list[int]) -> np.ndarray:
            regions = order[positions]
            rows = self.local[regions]
            return self.self_iou[int(self.image_of[regions[0]])][np.ix_(rows, rows)]

        return of

    def cover(self, order: np.ndarray) -> Callable[[list[int]], np.ndarray]:
        """``cover_of`` for :func:`drop_supersets` over the regions ``order``: the share of
        one region inside another, from their IoU and areas (``|a & b| = iou (|a| + |b|) /
        (1 + iou)``), so no mask is decoded again."""

        def of(positions: list[int]) -> np.ndarray:
            regions = order[positions]
            iou = self.pairwise(order)(positions)
            area = self.area[regions]
            inter = iou * (area[:, None] + area[None, :]) / (1.0 + iou)
            return inter / np.maximum(area[None, :], 1e-12)

        return of

    def repetition(self, vectors: np.ndarray, neighbours: int) -> np.ndarray:
        """:func:`~regionsearch.search.postprocess.repetition_scores` of every region, image by
        image (``vectors`` row-aligned with the regions)."""
        out = np.empty(self.size, dtype=np.float64)
        for image in np.unique(self.image_of):
            rows = np.flatnonzero(self.image_of == image)
            cover = self.cover(rows)(list(range(len(rows))))
            out[rows] = repetition_scores(vectors[rows], cover, neighbours)
        return out


@dataclass
class SearchCollection:
    """A dataset indexed twice: automatic proposals (as ``index`` makes them) and ground truth."""

    name: str
    class_names: list[str]
    images: list[np.ndarray]  # pixels as the indexer embeds them
    labels: list[np.ndarray]  # per image, class of each object
    sources: dict[str, RegionSet]
    proposal_seconds: float
    mask_source: str

    @property
    def objects_of(self) -> np.ndarray:
        return np.bincount(np.concatenate(self.labels), minlength=len(self.class_names))

    @property
    def queries(self) -> list[int]:
        """Classes that label at least one object (each is asked once)."""
        return np.flatnonzero(self.objects_of).tolist()


def _region_set(
    name: str,
    per_image: list[list[dict[str, Any]]],
    gt: list[np.ndarray],
    labels: list[np.ndarray],
    objectness: np.ndarray | None = None,
) -> RegionSet:
    image_of = np.concatenate([np.full(len(r), i) for i, r in enumerate(per_image)])
    local = np.concatenate([np.arange(len(r)) for r in per_image])
    area = np.concatenate(
        [
            np.asarray([rle_mod.area(x) for x in r], np.float64) / np.prod(gt[i].shape[1:])
            for i, r in enumerate(per_image)
        ]
    )
    g_max = max(len(x) for x in labels)
    overlap = np.full((len(image_of), g_max), -1.0)
    label_of = np.full((len(image_of), g_max), -1, dtype=np.int64)
    self_iou = []
    row = 0
    for rles, masks, lab in zip(per_image, gt, labels, strict=True):
        overlap[row : row + len(rles), : len(lab)] = rle_mod.iou_matrix(rles, masks)
        label_of[row : row + len(rles), : len(lab)] = lab
        self_iou.append(rle_mod.iou_matrix(rles, rles))
        row += len(rles)
    return RegionSet(
        name, per_image, image_of, area, overlap, label_of, self_iou, local, objectness
    )


def collect(
    dataset: RegionDataset, mask_source: Any, *, progress: bool = False
) -> SearchCollection:
    """Run the indexer's image preparation (decode + ``mask_source``) on every image.

    Raises :class:`DatasetError` when the indexer decodes an image at another size than its
    annotations (the masks could not be compared).
    """
    from tqdm import tqdm

    from regionsearch.indexer.pipeline import Failed, prepare_image

    images, labels, gt, proposals, scores = [], [], [], [], []
    seconds = 0.0
    for item in tqdm(dataset, total=len(dataset), desc="proposals", disable=not progress):
        path = dataset.images_dir / item.file_name
        tick = time.perf_counter()
        prepared = prepare_image(path, item.file_name, mask_source, None, keep_masks=False)
        seconds += time.perf_counter() - tick
        if isinstance(prepared, Failed):
            raise DatasetError(f"{item.file_name}: the indexer failed: {prepared.reason}")
        if prepared.pixels.shape[:2] != item.masks.shape[1:]:
            raise DatasetError(
                f"{item.file_name}: the indexer decodes {prepared.pixels.shape[:2]} pixels but "
                f"its annotations are {item.masks.shape[1:]}"
            )
        images.append(prepared.pixels)
        labels.append(np.asarray(item.labels, dtype=np.int64))
        gt.append(item.masks)
        proposals.append([r.rle for r in prepared.regions])
        scores += [np.nan if r.source_score is None else r.source_score for r in prepared.regions]
    if not images:
        raise DatasetError(f"{dataset.name}: no image with a usable mask was found")
    gt_rles = [rle_mod.encode_many(m) for m in gt]
    return SearchCollection(
        name=dataset.name,
        class_names=list(dataset.class_names),
        images=images,
        labels=labels,
        sources={
            "proposals": _region_set(
                "proposals", proposals, gt, labels, np.asarray(scores, np.float64)
            ),
            "ground-truth masks": _region_set("ground-truth masks", gt_rles, gt, labels),
        },
        proposal_seconds=seconds,
        mask_source=repr(mask_source),
    )


def embed_regions(embedder: Any, collection: SearchCollection, source: str) -> np.ndarray:
    """``(R, d)`` float32 vectors of one region set, image by image as the indexer embeds."""
    regions = collection.sources[source]
    out = [
        embedder.embed(pixels, rle_mod.decode_many(rles)).numpy()
        for pixels, rles in zip(collection.images, regions.rles, strict=True)
    ]
    return np.ascontiguousarray(np.concatenate(out), dtype=np.float32)
