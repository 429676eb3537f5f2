"""End-to-end search task and result switches: each fast path against a slow reference."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import numpy as np
import pytest

from regionsearch.eval.search_task import detection_metrics, rank
from regionsearch.masks import rle as rle_mod
from regionsearch.search.postprocess import (
    ResultOptions,
    calibrate_query,
    degenerate,
    drop_supersets,
    grid_cell_fraction,
    hubness_direction,
    mask_cover,
    objectness_prior,
    open_set_penalty,
    repetition_penalty,
    suppress_duplicates,
)

try:
    from test_search_repetition import brute_force_repetition
except ImportError:  # pragma: no cover - run from the repository root as a package
    from tests.test_search_repetition import brute_force_repetition

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


# ---------------------------------------------------------------------- switches


def _random_masks(rng: np.random.Generator, n: int, size: int = 24) -> np.ndarray:
    masks = np.zeros((n, size, size), bool)
    for m in masks:
        y, x = rng.integers(0, size - 4, 2)
        h, w = rng.integers(3, size // 2, 2)
        m[y : y + h, x : x + w] = True
    return masks


def brute_force_supersets(image_of, scores, masks, margin: float, cover: float) -> list[bool]:
    """Region i goes when a smaller region j of its image, ``cover`` of it inside i, scores at
    least ``scores[i] - margin`` (pixel counts, pair by pair)."""
    out = []
    for i, mi in enumerate(masks):
        out.append(
            any(
                j != i
                and image_of[j] == image_of[i]
                and mj.sum() < mi.sum()
                and (mi & mj).sum() >= cover * mj.sum()
                and scores[j] >= scores[i] - margin
                for j, mj in enumerate(masks)
            )
        )
    return out


def test_drop_supersets_equals_brute_force() -> None:
    rng = np.random.default_rng(4)
    masks = _random_masks(rng, 30)
    image_of = rng.integers(0, 3, 30)
    masks[8], image_of[8] = masks[3] | masks[4], image_of[3]  # a certain superset of 3
    scores = rng.uniform(0, 0.1, 30)
    rles = rle_mod.encode_many(masks)
    area = masks.reshape(30, -1).sum(1)

    def cover_of(members: list[int]) -> np.ndarray:
        return mask_cover([rles[m] for m in members])

    for margin, cover in ((0.0, 0.8), (0.02, 0.8), (0.05, 0.5), (1.0, 1.0)):
        got = drop_supersets(image_of, scores, area, cover_of, margin, cover)
        assert got.tolist() == brute_force_supersets(image_of, scores, masks, margin, cover)
    assert drop_supersets(image_of, scores, area, cover_of, 1.0, 0.8).any()
    # Hand-made: an object (20 px) and the object plus background (60 px) of one image.
    small = np.zeros((2, 10, 10), bool)
    small[0, :2, :10] = True
    small[1, :6, :10] = True
    nest = rle_mod.encode_many(small)
    assert mask_cover(nest)[1, 0] == pytest.approx(1.0)  # all of 0 lies inside 1
    assert mask_cover(nest)[0, 1] == pytest.approx(20 / 60)

    def nested(members: list[int]) -> np.ndarray:
        return mask_cover([nest[m] for m in members])

    for inner, outer, expected in ((0.49, 0.5, [False, True]), (0.45, 0.5, [False, False])):
        got = drop_supersets([0, 0], [inner, outer], [20, 60], nested, 0.02, 0.8)
        assert got.tolist() == expected  # the union goes only if the object is close behind
    assert not drop_supersets([0, 1], [0.5, 0.5], [20, 60], nested, 0.02, 0.8).any()
    with pytest.raises(ValueError, match="superset_margin"):
        ResultOptions(superset_margin=-0.1)
    with pytest.raises(ValueError, match="superset_cover"):
        ResultOptions(superset_cover=0.0)
    assert ResultOptions(superset_margin=0.03).score_slack == 0.03
    assert ResultOptions.plain().score_slack == 0.0


def test_suppress_duplicates_equals_brute_force() -> None:
    rng = np.random.default_rng(0)
    masks = _random_masks(rng, 30)
    image_of = rng.integers(0, 3, 30)
    masks[7], image_of[7] = masks[2], image_of[2]  # a certain duplicate

    def iou(a: np.ndarray, b: np.ndarray) -> float:
        return (a & b).sum() / (a | b).sum()

    for threshold in (0.2, 0.5):
        keep = suppress_duplicates(image_of, masks, threshold)
        expected: list[int] = []
        for i in range(30):
            rivals = [j for j in expected if image_of[j] == image_of[i]]
            if all(iou(masks[i], masks[j]) < threshold for j in rivals):
                expected.append(i)
        assert np.flatnonzero(keep).tolist() == expected
        assert expected != list(range(30))  # something was suppressed
        rles = rle_mod.encode_many(masks)
        assert suppress_duplicates(image_of, rles, threshold).tolist() == keep.tolist()
    # identical masks of different images never suppress each other
    same = np.repeat(masks[:1], 3, axis=0)
    assert suppress_duplicates([0, 1, 2], same, 0.5).all()
    assert suppress_duplicates([0, 0, 2], same, 0.5).tolist() == [True, False, True]


def test_calibration_is_mean_bank_similarity_subtracted() -> None:
    rng = np.random.default_rng(1)
    unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731
    regions, bank, query = unit(rng.normal(size=(50, 16))), unit(rng.normal(size=(7, 16))), None
    query = unit(rng.normal(size=16))
    for weight in (0.0, 0.5, 1.0):
        direct = regions @ query - weight * (regions @ bank.T).mean(axis=1)
        shifted = regions @ calibrate_query(query, hubness_direction(bank), weight)
        np.testing.assert_allclose(shifted, direct, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="non-empty"):
        hubness_direction(np.zeros((0, 16)))


def test_degenerate_and_objectness_priors() -> None:
    cell = grid_cell_fraction(8, 96)
    assert cell == pytest.approx(1 / 144)
    options = ResultOptions(min_cells=1.5, max_area=0.9)
    area = np.array([0.5 * cell, 1.4 * cell, 1.6 * cell, 0.5, 0.91, 1.0])
    assert degenerate(area, options, cell).tolist() == [True, True, False, False, True, True]
    assert not degenerate(area, ResultOptions.plain(), cell).any()
    # The default keeps objects of a cell or so (small objects on wide canvases are common):
    # only specks under half a cell go.
    small = np.array([0.4 * cell, 0.6 * cell, 1.0 * cell])
    assert degenerate(small, ResultOptions(), cell).tolist() == [True, False, False]
    prior = objectness_prior([1.0, 0.5, None, 0.0, float("nan")], 0.1)
    np.testing.assert_allclose(prior, [0, 0.1 * np.log(0.5), 0, 0.1 * np.log(1e-4), 0])
    assert (prior <= 0).all()
    with pytest.raises(ValueError, match="max_area"):
        ResultOptions(max_area=0)
    with pytest.raises(ValueError, match="calibration"):
        ResultOptions(calibration=-1)


def test_rank_applies_switches_in_order() -> None:
    """rank(): prior, then degenerate regions out, then supersets, then NMS over the rest."""
    from regionsearch.eval.search_collection import RegionSet

    rng = np.random.default_rng(2)
    masks = _random_masks(rng, 12)
    masks[11] = True  # the whole image
    masks[10] = masks[2] | masks[3]  # holds two regions
    rles = rle_mod.encode_many(masks)
    regions = RegionSet(
        "t",
        [rles],
        np.zeros(12, np.int64),
        masks.reshape(12, -1).mean(1),
        np.zeros((12, 1)),
        np.zeros((12, 1), np.int64),
        [rle_mod.iou_matrix(rles, rles)],
        np.arange(12),
        rng.uniform(0.01, 1, 12),
    )
    scores = rng.normal(size=12, scale=0.05)
    scores[11] = 10.0
    for options in (
        ResultOptions(),
        ResultOptions.plain(),
        ResultOptions(dedupe_iou=0.2),
        ResultOptions(superset_margin=0.1, superset_cover=0.5),
    ):
        adjusted = scores + objectness_prior(regions.objectness, options.objectness)
        order = [
            i
            for i in np.argsort(-adjusted, kind="stable")
            if not degenerate(regions.area[[i]], options, 0.01)[0]
        ]
        if options.superset_margin is not None:
            gone = brute_force_supersets(
                [0] * len(order),
                adjusted[order],
                masks[order],
                options.superset_margin,
                options.superset_cover,
            )
            order = [i for i, g in zip(order, gone, strict=True) if not g]
        if options.dedupe_iou is not None:
            flags = suppress_duplicates(np.zeros(len(order)), masks[order], options.dedupe_iou)
            order = [i for i, f in zip(order, flags, strict=True) if f]
        assert rank(scores, regions, options, 0.01).tolist() == order
    assert 11 not in rank(scores, regions, ResultOptions(), 0.01).tolist()
    loose = ResultOptions(superset_margin=1.0, superset_cover=0.5, dedupe_iou=None)
    assert 10 in rank(scores, regions, dataclasses.replace(loose, superset_margin=None), 0.01)
    assert 10 not in rank(scores, regions, loose, 0.01)


# ---------------------------------------------------------------------- searcher


@pytest.fixture(scope="module")
def overlapping_index(tmp_path_factory: pytest.TempPathFactory):
    """An index whose images hold overlapping, tiny, huge and scored regions."""
    try:
        from test_search import DIM, tiny_backbone
    except ImportError:  # pragma: no cover - run from the repository root as a package
        from tests.test_search import DIM, tiny_backbone

    from regionsearch.store import NewRegion, RegionIndex

    backbone = tiny_backbone()
    rng = np.random.default_rng(5)
    directory = tmp_path_factory.mktemp("switches") / "index"
    index = RegionIndex.create(
        directory, model=backbone.name, embedder="masked-crop", dimension=DIM
    )
    try:
        records = index.upsert_images(
            [{"path": f"img{i}.png", "width": 32, "height": 32} for i in range(8)]
        )
        batch = []
        for rec in records:
            masks = _random_masks(rng, 12, size=32)
            masks[0] = True
            masks[1] = False
            masks[1, :3, :3] = True  # under one cell
            masks[3] = masks[2]  # an exact duplicate
            masks[4] = masks[5] | masks[6]  # holds two regions
            regions = [
                NewRegion(
                    rle=rle_mod.encode(m),
                    bbox=tuple(rle_mod.bbox(rle_mod.encode(m))),
                    area=float(m.sum()),
                    source="proposal",
                    source_score=None if j % 5 == 0 else float(rng.uniform(0.001, 1)),
                )
                for j, m in enumerate(masks)
            ]
            vectors = rng.normal(size=(12, DIM)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            batch.append((rec.id, regions, vectors))
        ids = index.add_images_regions(batch)
        index.checkpoint()
    finally:
        index.close()
    return directory, backbone, np.concatenate(ids), np.concatenate([b[2] for b in batch])


def test_searcher_switches_equal_postprocessing_the_whole_ranking(overlapping_index) -> None:
    """Over-fetching is exact: top-k equals the switches applied to every region."""
    from regionsearch.search import RegionSearcher
    from regionsearch.search.postprocess import model_cell_fraction
    from regionsearch.store import RegionIndex

    directory, backbone, all_ids, vectors = overlapping_index
    index = RegionIndex.open(directory, read_only=True)
    try:
        records = {r.id: r for r in index.fetch_regions(all_ids)}
        cell = model_cell_fraction(backbone)
        rng = np.random.default_rng(9)
        dropped = demoted = 0
        for options, k, one in itertools.product(
            (
                ResultOptions(),
                ResultOptions(dedupe_iou=0.3, calibration=0.5, objectness=0.2),
                ResultOptions(open_set=1.0, open_set_tau=0.1, calibration=0.5),
                ResultOptions(superset_margin=0.3, superset_cover=0.6),
                ResultOptions(superset_margin=None),
                ResultOptions(repetition=1.0, repetition_floor=0.0, repetition_neighbours=2),
                ResultOptions(repetition=0.5, open_set=1.0, calibration=0.5, superset_margin=0.1),
            ),
            (1, 5, 40),
            (False, True),
        ):
            searcher = RegionSearcher(index, backbone, results=options)
            query = rng.normal(size=vectors.shape[1]).astype(np.float32)
            query /= np.linalg.norm(query)
            shifted = calibrate_query(query, searcher.calibration_direction(), options.calibration)
            recs = [records[int(i)] for i in all_ids]
            scores = vectors @ shifted + objectness_prior(
                [r.source_score for r in recs], options.objectness
            )
            if options.open_set:  # against the searcher's own bank, from every region's vector
                scores += open_set_penalty(
                    vectors @ query,
                    vectors @ searcher.calibration_bank().T,
                    options.open_set_tau,
                    options.open_set,
                )
            if options.repetition:  # against every region of the image, from the masks
                repetition = brute_force_repetition(
                    np.asarray([r.image_id for r in recs]),
                    vectors,
                    np.stack([rle_mod.decode(r.rle).astype(bool) for r in recs]),
                    options.repetition_neighbours,
                )
                term = repetition_penalty(repetition, options)
                demoted += int((term < 0).sum())
                scores += term
            area = [r.area / (32 * 32) for r in recs]
            order = [
                i
                for i in np.argsort(-scores, kind="stable")
                if not degenerate([area[i]], options, cell)[0]
            ]
            if options.superset_margin is not None:
                gone = brute_force_supersets(
                    [recs[i].image_id for i in order],
                    scores[order],
                    [rle_mod.decode(recs[i].rle).astype(bool) for i in order],
                    options.superset_margin,
                    options.superset_cover,
                )
                dropped += sum(gone)
                order = [i for i, g in zip(order, gone, strict=True) if not g]
            keep = suppress_duplicates(
                [recs[i].image_id for i in order], [recs[i].rle for i in order], options.dedupe_iou
            )
            order = [i for i, f in zip(order, keep, strict=True) if f]
            if one:
                best: dict[int, int] = {}
                for i in order:
                    best.setdefault(recs[i].image_id, i)
                order = list(best.values())
            hits = searcher.search_vector(query, k=k, one_per_image=one)
            assert [h.region_id for h in hits] == [int(all_ids[i]) for i in order[:k]]
            np.testing.assert_allclose(
                [h.score for h in hits], [scores[i] for i in order[:k]], rtol=1e-5, atol=1e-5
            )
            if k == 40:  # the searcher did drop degenerate regions and duplicates
                assert len(hits) < len(all_ids)
        assert dropped and demoted  # and supersets, and repeated regions lost score
    finally:
        index.close()


def test_searcher_reuses_repetition_scores_between_searches(overlapping_index) -> None:
    """The per-image mask cache changes nothing but the work: a second search (cache warm) and
    a fresh searcher (cache cold) return the same hits and scores."""
    from regionsearch.search import RegionSearcher
    from regionsearch.store import RegionIndex

    directory, backbone, _, vectors = overlapping_index
    options = ResultOptions(repetition=1.0, repetition_floor=0.0)
    query = vectors[7] / np.linalg.norm(vectors[7])
    index = RegionIndex.open(directory, read_only=True)
    try:
        searcher = RegionSearcher(index, backbone, results=options)
        first = searcher.search_vector(query, k=20)
        assert len(searcher.image_masks) > 0
        again = searcher.search_vector(query, k=20)
        cold = RegionSearcher(index, backbone, results=options).search_vector(query, k=20)
    finally:
        index.close()
    for hits in (again, cold):
        assert [(h.region_id, h.score) for h in hits] == [(h.region_id, h.score) for h in first]


# ---------------------------------------------------------------------- the eval task


def test_search_task_on_a_tiny_world(tmp_path: Path) -> None:
    """Ground-truth source with plain order: detection AP equals the retrieval task's AP (two
    independent implementations); proposals come from the indexer's own preparation."""
    from regionsearch.backbone import Backbone
    from regionsearch.embedders import get_embedder
    from regionsearch.eval.datasets import RegionDataset
    from regionsearch.eval.search_collection import collect, embed_regions
    from regionsearch.eval.search_task import query_texts, score_queries
    from regionsearch.eval.tasks import retrieval_hits
    from regionsearch.eval.world.generate import generate_dataset
    from regionsearch.indexer.pipeline import prepare_image
    from regionsearch.masks import AutomaticProposals

    generate_dataset(tmp_path / "w", n=3, seed=11, size=96, min_objects=2, max_objects=3)
    dataset = RegionDataset.from_world(tmp_path / "w")
    proposer = AutomaticProposals(max_regions=12)
    collection = collect(dataset, proposer)
    first = next(iter(dataset))
    prepared = prepare_image(
        dataset.images_dir / first.file_name, first.file_name, proposer, None, False
    )
    assert collection.sources["proposals"].rles[0] == [r.rle for r in prepared.regions]
    backbone = Backbone.load("reference")
    embedder = get_embedder("masked-crop", backbone)
    texts = query_texts(collection, backbone)
    gt_vectors = embed_regions(embedder, collection, "ground-truth masks")
    plain = score_queries(
        collection, "ground-truth masks", gt_vectors, texts, ResultOptions.plain(), 0
    )
    labels = np.concatenate(collection.labels)
    ap, _ = retrieval_hits(gt_vectors, texts, labels)
    assert plain["mAP"] == pytest.approx(float(ap.mean()))
    assert plain["queries"] == len(np.unique(labels))
    proposals = collection.sources["proposals"]
    assert proposals.size == sum(len(r) for r in proposals.rles) and proposals.covered(0.5) > 0
    vectors = embed_regions(embedder, collection, "proposals")
    result = score_queries(collection, "proposals", vectors, texts, ResultOptions(), 1 / 144)
    assert 0 <= result["mAP"] <= 1 and 0 <= result["P@10"] <= 1


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
        masks = _random_masks(rng, 3, size)
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
        region_masks += list(_random_masks(rng, 3, size))
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


def test_eval_cli_search_task(tmp_path: Path) -> None:
    """``regionsearch eval --tasks search`` writes search rows; switches change the ranking;
    a bad switch value is a one-line error."""
    import json

    import typer
    from typer.testing import CliRunner

    from regionsearch.eval.cli import eval_command
    from regionsearch.eval.world.generate import generate_dataset

    generate_dataset(tmp_path / "w", n=2, seed=12, size=96, min_objects=2, max_objects=3)
    app = typer.Typer()
    app.command()(eval_command)
    base = ["--world", str(tmp_path / "w"), "--tasks", "search", "--embedders", "masked-crop"]
    base += ["--no-progress", "--max-regions", "10"]
    values = {}
    for flag in ("--plain-search", "--max-area=0.001"):  # the latter drops every region
        out = tmp_path / f"{flag}.json"
        report = tmp_path / f"{flag}.md"
        result = CliRunner().invoke(
            app, [*base, flag, "--json", str(out), "--markdown", str(report)]
        )
        assert result.exit_code == 0, result.output
        rows = json.loads(out.read_text())
        values[flag] = {(r["task"], r["metric"]): r["value"] for r in rows}
        assert set(values[flag]) == {
            ("search", "mAP"),
            ("search", "P@10"),
            ("search", "top-1"),
            ("search-gt", "mAP"),
        }
        assert "search result switches" in report.read_text()
    assert values["--plain-search"][("search", "mAP")] > 0
    assert values["--max-area=0.001"][("search", "mAP")] == 0
    assert values["--max-area=0.001"][("search-gt", "mAP")] > 0  # the ceiling keeps its masks
    result = CliRunner().invoke(app, [*base, "--max-area", "0"])
    assert result.exit_code == 2 and "search option: max_area" in result.output
    for margin, shown in (("-1", "superset_margin=None"), ("0.05", "superset_margin=0.05")):
        report = tmp_path / f"superset{margin}.md"
        result = CliRunner().invoke(
            app, [*base, "--superset-margin", margin, "--markdown", str(report)]
        )
        assert result.exit_code == 0, result.output
        assert shown in report.read_text()
    result = CliRunner().invoke(app, [*base, "--superset-cover", "1.5"])
    assert result.exit_code == 2 and "search option: superset_cover" in result.output
    # the repeated-stuff term: on by default for masked crop, off with --repetition 0
    for weight, shown in (("", "repetition=0.5"), ("0", "repetition=0.0")):
        report = tmp_path / f"repetition{weight}.md"
        flags = ["--repetition", weight] if weight else []
        result = CliRunner().invoke(app, [*base, *flags, "--markdown", str(report)])
        assert result.exit_code == 0, result.output
        assert shown in report.read_text()
    result = CliRunner().invoke(app, [*base, "--repetition-floor", "2"])
    assert result.exit_code == 2 and "search option: repetition_floor" in result.output
