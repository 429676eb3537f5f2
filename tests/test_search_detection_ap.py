"""Detection-style AP of the search task: hand-made, brute-force and COCOeval references."""

from __future__ import annotations

import numpy as np
import pytest
from search_references import random_rectangles

from regionsearch.eval.search_task import detection_metrics
from regionsearch.masks import rle as rle_mod

# ---------------------------------------------------------------------- detection AP


def brute_force_ap(
    ranking: list[int], image_of, overlap, is_class, objects: int, iou: float
) -> tuple[float, float, bool]:
    """AP as the area under the precision/recall steps, re-matching every prefix from scratch
    with pycocotools' rule (each region takes the free same-class object it overlaps most)."""

    def hits_of(prefix: list[int]) -> list[bool]:
        taken: set[tuple[int, int]] = set()
        out = []
        for r in prefix:
            free = [
                g
                for g in range(overlap.shape[1])
                if is_class[r, g] and overlap[r, g] >= iou and (image_of[r], g) not in taken
            ]
            if free:
                taken.add((image_of[r], max(free, key=lambda g: overlap[r, g])))
            out.append(bool(free))
        return out

    ap, previous_recall = 0.0, 0.0
    for n in range(1, len(ranking) + 1):
        hits = hits_of(ranking[:n])
        precision, recall = sum(hits) / n, sum(hits) / objects
        ap += precision * (recall - previous_recall)
        previous_recall = recall
    top10 = hits_of(ranking[:10])
    return ap, sum(top10) / 10, bool(ranking) and hits_of(ranking[:1])[0]


def test_detection_ap_hand_made_case() -> None:
    # Two images; image 0 holds two cats (objects 0, 1) and a dog (2); image 1 one cat (0).
    # Regions, best first: r0 covers cat 0 (IoU .8), r1 duplicates it (IoU .6), r2 covers the
    # dog, r3 covers cat 1 at .4 (a miss), r4 covers image 1's cat, r5 covers cat 1 at .5.
    image_of = np.array([0, 0, 0, 0, 1, 0])
    overlap = np.array(
        [
            [0.8, 0.0, 0.0],
            [0.6, 0.1, 0.0],
            [0.0, 0.0, 0.9],
            [0.0, 0.4, 0.0],
            [0.7, -1, -1],
            [0.2, 0.5, 0.0],
        ]
    )
    labels = np.array([[0, 0, 1]] * 4 + [[0, -1, -1]] + [[0, 0, 1]])
    is_cat = labels == 0
    ranking = np.arange(6)
    ap, p10, top1 = detection_metrics(ranking, image_of, overlap, is_cat, objects=3)
    # hits at ranks 1, 5, 6: AP = (1/1 + 2/5 + 3/6) / 3 cats
    assert ap == pytest.approx((1 + 2 / 5 + 3 / 6) / 3)
    assert p10 == pytest.approx(0.3) and top1
    assert (ap, p10, top1) == pytest.approx(
        brute_force_ap(ranking.tolist(), image_of, overlap, is_cat, 3, 0.5)
    )
    # the duplicate r1 first: it takes cat 0, so r0 becomes the duplicate
    ap2, _, _ = detection_metrics(np.array([1, 0, 2, 3, 4, 5]), image_of, overlap, is_cat, 3)
    assert ap2 == pytest.approx((1 + 2 / 5 + 3 / 6) / 3)
    # a region overlapping two free cats takes the one it overlaps most, leaving the other
    both = np.array([[0.55, 0.7]])
    assert detection_metrics(np.array([0]), np.array([0]), both, both > 0, 2)[0] == 0.5
    # regions not returned (dropped by a switch) are simply not in the ranking
    ap3, _, top3 = detection_metrics(np.array([2, 3]), image_of, overlap, is_cat, 3)
    assert ap3 == 0.0 and not top3


def test_detection_ap_matches_brute_force_on_random_cases() -> None:
    rng = np.random.default_rng(3)
    for _ in range(40):
        regions, objects_per_image = int(rng.integers(1, 14)), 3
        image_of = rng.integers(0, 3, regions)
        overlap = np.round(rng.uniform(0, 1, (regions, objects_per_image)), 1)
        labels = rng.integers(0, 2, (3, objects_per_image))
        is_class = labels[image_of] == 0
        objects = int((labels == 0).sum())
        ranking = rng.permutation(regions)
        fast = detection_metrics(ranking, image_of, overlap, is_class, max(objects, 1))
        slow = brute_force_ap(ranking.tolist(), image_of, overlap, is_class, max(objects, 1), 0.5)
        assert fast == pytest.approx(slow)


def test_matching_agrees_with_cocoeval() -> None:
    """Our matching rule, scored with COCOeval's interpolation, gives COCOeval's own AP."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from regionsearch.eval.search_task import match_ranking

    rng = np.random.default_rng(4)
    size, n_images = 20, 3
    images, annotations, detections = [], [], []
    gt_masks: list[np.ndarray] = []
    gt_labels: list[np.ndarray] = []
    for image_id in range(1, n_images + 1):
        images.append({"id": image_id, "width": size, "height": size, "file_name": f"{image_id}"})
        masks = random_rectangles(rng, 3, size)
        labels = rng.integers(1, 3, 3)
        gt_masks.append(masks)
        gt_labels.append(labels)
        for m, label in zip(masks, labels, strict=True):
            rle = rle_mod.encode(m)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(label),
                    "segmentation": rle,
                    "area": float(m.sum()),
                    "bbox": rle_mod.bbox(rle),
                    "iscrowd": 0,
                }
            )
    coco = COCO()
    coco.dataset = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }
    coco.createIndex()
    region_masks, image_of = [], []
    for image in range(n_images):  # regions: the objects jittered, plus random ones
        for m in gt_masks[image]:  # two jittered copies each: duplicates must be misses
            for _ in range(2):
                shift, axis = int(rng.integers(-1, 2)), int(rng.integers(0, 2))
                region_masks.append(np.roll(m, shift, axis=axis))
                image_of.append(image)
        region_masks += list(random_rectangles(rng, 3, size))
        image_of += [image] * 3
    region_masks_arr, image_of_arr = np.stack(region_masks), np.asarray(image_of)
    scores = rng.permutation(len(region_masks)) / len(region_masks) + 0.01  # distinct
    overlap = np.full((len(region_masks), 3), -1.0)
    label_of = np.full((len(region_masks), 3), -1)
    for r, (m, image) in enumerate(zip(region_masks_arr, image_of_arr, strict=True)):
        overlap[r] = rle_mod.iou_matrix(m[None], gt_masks[image])[0]
        label_of[r] = gt_labels[image]
    for category in (1, 2):
        for r, (m, image) in enumerate(zip(region_masks_arr, image_of_arr, strict=True)):
            detections.append(
                {
                    "image_id": int(image) + 1,
                    "category_id": category,
                    "segmentation": rle_mod.encode(m),
                    "score": float(scores[r]),
                }
            )
    evaluator = COCOeval(coco, coco.loadRes(detections), "segm")
    evaluator.params.iouThrs = np.array([0.5])
    evaluator.params.maxDets = [100]
    evaluator.params.areaRng = [[0, 1e10]]
    evaluator.params.areaRngLbl = ["all"]
    evaluator.evaluate()
    evaluator.accumulate()
    ranking = np.argsort(-scores, kind="stable")
    for k, category in enumerate((1, 2)):
        hits = match_ranking(ranking, image_of_arr, overlap, label_of == category)
        objects = int(sum((labels == category).sum() for labels in gt_labels))
        tp = np.cumsum(hits)
        precision = tp / np.arange(1, len(hits) + 1)
        recall = tp / objects
        envelope = np.maximum.accumulate(precision[::-1])[::-1]
        sampled = [
            envelope[np.searchsorted(recall, r, side="left")] if r <= recall[-1] else 0.0
            for r in evaluator.params.recThrs
        ]
        duplicates = ((label_of == category) & (overlap >= 0.5)).any(axis=1)[ranking] & ~hits
        assert hits.any() and duplicates.any()
        coco_ap = evaluator.eval["precision"][0, :, k, 0, 0].mean()
        assert float(np.mean(sampled)) == pytest.approx(float(coco_ap), abs=1e-9)
