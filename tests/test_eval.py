"""Benchmark metrics, dataset loading, runner, report and the ``eval`` command (mechanics only:
the tiny random backbone says nothing about quality)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from pycocotools import mask as mask_utils

from regionsearch.eval import tasks
from regionsearch.eval.datasets import (
    DatasetError,
    EvalError,
    RegionDataset,
    category_colour,
    load_expressions,
)
from regionsearch.eval.report import bar_chart, markdown_table, read_json, write_json
from regionsearch.eval.runner import (
    POINTING_LABEL,
    ROW_KEYS,
    TIMING_KEYS,
    EmbedderSpec,
    TextCache,
    expression_variant,
    parse_embedders,
    run_eval,
)
from regionsearch.eval.tasks import colour_ambiguous, pointing_hits
from regionsearch.image_io import decode_bytes, decode_image


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread while these tests run: the tiny models gain nothing from more, and on a
    busy 2-core machine two threads spin against the other jobs (measured 25x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------- metrics


def one_hot(indices, dim):
    return F.one_hot(torch.as_tensor(indices), dim).float()


def test_perfect_embeddings_score_one():
    classes = torch.eye(6)
    labels = [0, 3, 5, 1, 1]
    hits = tasks.classification_hits(classes[labels], classes, labels, ks=(1, 5))
    assert tasks.accuracy(hits[1]) == (1.0, 5)
    assert tasks.accuracy(hits[5]) == (1.0, 5)

    masks = torch.eye(3)
    owners = [0, 0, 1, 2, 2, 2]
    sentences = masks[owners]
    assert tasks.mask_to_expression_hits(masks, sentences, owners).all()
    assert tasks.expression_to_mask_hits(masks, sentences, owners).all()


def _average_precision_by_definition(scores: np.ndarray, relevant: np.ndarray) -> float:
    """AP the slow way: walk the ranking, average precision at every relevant position."""
    ranked = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    found, total = 0, 0.0
    for position, index in enumerate(ranked, start=1):
        if relevant[index]:
            found += 1
            total += found / position
    return total / found


def test_retrieval_by_hand_and_against_the_definition():
    # Class 0 labels regions 0 and 2; its text scores region 1 highest, then 0, then 2:
    # AP = (1/2 + 2/3) / 2 and its top region is wrong. Class 1 finds region 1 first: AP 1.
    classes = torch.eye(2)
    regions = torch.tensor([[0.8, 0.0], [0.9, 1.0], [0.1, 0.0]])
    ap, top1 = tasks.retrieval_hits(regions, classes, [0, 1, 0])
    assert ap.tolist() == pytest.approx([(1 / 2 + 2 / 3) / 2, 1.0])
    assert top1.tolist() == [False, True]

    rng = np.random.default_rng(0)
    regions = F.normalize(torch.from_numpy(rng.normal(size=(60, 8))), dim=-1)
    classes = F.normalize(torch.from_numpy(rng.normal(size=(7, 8))), dim=-1)
    labels = rng.integers(0, 6, size=60)  # class 6 labels nothing: it is not a query
    ap, top1 = tasks.retrieval_hits(regions, classes, labels)
    scores = (classes @ regions.T).numpy()
    present = np.unique(labels)
    expected = [_average_precision_by_definition(scores[c], labels == c) for c in present]
    np.testing.assert_allclose(ap, expected, rtol=1e-12)
    assert top1.tolist() == [labels[scores[c].argmax()] == c for c in present]
    perfect_ap, perfect_top1 = tasks.retrieval_hits(classes[labels], classes, labels)
    assert perfect_ap == pytest.approx(np.ones(len(present))) and perfect_top1.all()


def test_known_permutation_gives_known_accuracy():
    # Regions 0..5 embedded as classes [1, 0, 2, 3, 5, 4]: only labels 2 and 3 are right.
    classes = torch.eye(6)
    predicted = [1, 0, 2, 3, 5, 4]
    labels = list(range(6))
    hits = tasks.classification_hits(classes[predicted], classes, labels, ks=(1,))
    assert hits[1].tolist() == [False, False, True, True, False, False]
    assert tasks.accuracy(hits[1])[0] == pytest.approx(2 / 6)


def test_acc5_counts_rank_and_is_at_least_acc1():
    # Scores fixed by hand: the target of row 0 ranks 1st, row 1 ranks 3rd, row 2 ranks 6th.
    scores = np.array(
        [
            [0.9, 0.1, 0.2, 0.3, 0.4, 0.5],
            [0.9, 0.8, 0.7, 0.1, 0.0, 0.0],
            [0.1, 0.9, 0.8, 0.7, 0.6, 0.5],
        ]
    )
    labels = [0, 2, 0]
    top1 = tasks.topk_hits(scores, labels, 1)
    top3 = tasks.topk_hits(scores, labels, 3)
    top5 = tasks.topk_hits(scores, labels, 5)
    assert top1.tolist() == [True, False, False]
    assert top3.tolist() == [True, True, False]
    assert top5.tolist() == [True, True, False]
    assert tasks.topk_hits(scores, labels, 6).all()  # k >= candidates: every item is a hit
    rng = np.random.default_rng(0)
    regions, classes = rng.normal(size=(40, 8)), rng.normal(size=(10, 8))
    hits = tasks.classification_hits(regions, classes, rng.integers(0, 10, 40))
    assert hits[5].mean() >= hits[1].mean()
    assert (hits[5] | ~hits[1]).all()  # every top-1 hit is a top-5 hit


def test_ties_go_to_the_lower_index():
    scores = np.array([[0.5, 0.5, 0.1]])
    assert tasks.topk_hits(scores, [0], 1).tolist() == [True]
    assert tasks.topk_hits(scores, [1], 1).tolist() == [False]
    assert tasks.topk_hits(scores, [1], 2).tolist() == [True]


def test_expression_protocols_by_hand():
    # 3 masks; mask 2 has no sentence. Sentence 0,1 -> mask 0, sentence 2 -> mask 1.
    masks = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    sentences = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.8, 0.6]])
    owners = [0, 0, 1]
    # mask 0 best sentence: s1 (1.0) -> own: hit; mask 1 best: s0 (1.0) -> mask 0's: miss.
    assert tasks.mask_to_expression_hits(masks, sentences, owners).tolist() == [True, False]
    # s0 -> mask 1 (1.0) miss; s1 -> mask 0 (1.0) hit; s2 -> mask 2 (0.96) miss (unowned mask).
    assert tasks.expression_to_mask_hits(masks, sentences, owners).tolist() == [False, True, False]
    assert tasks.accuracy([np.array([True, False]), np.array([True])]) == (pytest.approx(2 / 3), 3)
    value, n = tasks.accuracy([])
    assert math.isnan(value) and n == 0
    with pytest.raises(ValueError, match="owner"):
        tasks.expression_to_mask_hits(masks, sentences, [0, 5, 1])


# ---------------------------------------------------------------------- dataset


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def write_tiny_coco(folder, exif_rotate: bool = False):
    """Two 20x30 (H x W) images: a polygon, an RLE, a crowd and a tiny annotation."""
    (folder / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = []
    for image_id in (1, 2):
        name = f"{image_id}.jpg" if exif_rotate and image_id == 2 else f"{image_id}.png"
        pixels = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
        if exif_rotate and image_id == 2:
            # Stored rotated (30 x 20) with EXIF orientation 6: displays as 20 x 30.
            raw = Image.fromarray(np.ascontiguousarray(np.rot90(pixels, k=1)))
            exif = Image.Exif()
            exif[0x0112] = 6
            raw.save(folder / "img" / name, exif=exif, quality=95)
        else:
            Image.fromarray(pixels).save(folder / "img" / name)
        images.append({"id": image_id, "file_name": name, "height": 20, "width": 30})
    rle_mask = np.zeros((20, 30), dtype=bool)
    rle_mask[5:15, 20:28] = True
    annotations = [
        # polygon: a 10x10 square at x 2..12, y 3..13
        {"id": 11, "image_id": 1, "category_id": 3, "iscrowd": 0,
         "segmentation": [[2, 3, 12, 3, 12, 13, 2, 13]], "area": 100, "bbox": [2, 3, 10, 10]},
        {"id": 12, "image_id": 1, "category_id": 1, "iscrowd": 0,
         "segmentation": _rle(rle_mask), "area": 80, "bbox": [20, 5, 8, 10]},
        {"id": 13, "image_id": 1, "category_id": 1, "iscrowd": 1,
         "segmentation": {"size": [20, 30], "counts": [0, 600]}, "area": 600, "bbox": [0, 0, 30, 20]},
        # tiny: 2x2 = 4 px < 16
        {"id": 14, "image_id": 1, "category_id": 3, "iscrowd": 0,
         "segmentation": [[0, 0, 2, 0, 2, 2, 0, 2]], "area": 4, "bbox": [0, 0, 2, 2]},
        {"id": 21, "image_id": 2, "category_id": 3, "iscrowd": 0,
         "segmentation": [[0, 0, 30, 0, 30, 10, 0, 10]], "area": 300, "bbox": [0, 0, 30, 10]},
    ]  # fmt: skip
    categories = [
        {"id": 1, "name": "traffic_light"},
        {"id": 3, "name": "dog"},
        {"id": 2, "name": "hair drier"},
    ]
    path = folder / "instances.json"
    path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": categories})
    )
    return folder / "img", path


def test_dataset_loads_polygons_and_rle_and_skips_crowd_and_tiny(tmp_path):
    images, annotations = write_tiny_coco(tmp_path)
    data = RegionDataset(images, annotations)
    assert data.class_names == ["traffic light", "hair drier", "dog"]  # id order, no underscores
    items = list(data)
    assert [i.image_id for i in items] == [1, 2]
    first = items[0]
    assert first.image.shape == (20, 30, 3) and first.image.dtype == np.uint8
    assert first.ann_ids == [11, 12]  # crowd 13 and tiny 14 skipped
    assert first.labels == [2, 0]
    assert first.masks.shape == (2, 20, 30) and first.masks.dtype == bool
    assert first.masks[0, 5, 5] and not first.masks[0, 15, 15]
    assert first.masks[1].sum() == 80 and first.masks[1, 10, 25]
    assert data.skipped["crowd"] == 1
    assert first.expressions == [[], []]
    assert len(RegionDataset(images, annotations, limit=1)) == 1


def test_dataset_applies_exif_orientation(tmp_path):
    images, annotations = write_tiny_coco(tmp_path, exif_rotate=True)
    item = list(RegionDataset(images, annotations))[1]
    assert item.image.shape == (20, 30, 3)
    assert item.masks.shape == (1, 20, 30)

    # A dataset annotated on the stored (raw) pixels: the raw orientation is used.
    coco = json.loads(annotations.read_text())
    coco["images"][1].update(height=30, width=20)
    annotations.write_text(json.dumps(coco))
    item = list(RegionDataset(images, annotations))[1]
    raw = decode_bytes((images / "2.jpg").read_bytes(), exif_transpose=False)
    assert raw.shape == (30, 20, 3) and np.array_equal(item.image, raw)
    coco["images"][1].update(height=25, width=25)
    annotations.write_text(json.dumps(coco))
    with pytest.raises(DatasetError, match="is 30x20 but its annotations are for 25x25"):
        list(RegionDataset(images, annotations))


def test_dataset_decodes_images_exactly_as_the_indexer(tmp_path):
    """16-bit grey is scaled (Pillow's convert clips it to white) and transparency lands on
    white, as in ``regionsearch index``: the mask tasks and the search task see one image."""
    images, annotations = write_tiny_coco(tmp_path)
    ramp = (np.arange(20 * 30, dtype=np.uint16).reshape(20, 30) * 100).astype(np.uint16)
    Image.fromarray(ramp).save(images / "1.png")  # mode I;16
    rgba = np.zeros((20, 30, 4), dtype=np.uint8)
    rgba[:, :15] = (200, 30, 30, 255)  # left half opaque red, right half fully transparent
    Image.fromarray(rgba, mode="RGBA").save(images / "2.png")
    items = list(RegionDataset(images, annotations))
    for item in items:
        assert np.array_equal(item.image, decode_image(images / item.file_name).pixels)
    grey = items[0].image[..., 0].astype(int)
    assert grey.max() < 255 and grey[-1, -1] > grey[0, 5] > 0  # a ramp, not clipped white
    assert tuple(items[1].image[0, 0]) == (200, 30, 30) and tuple(items[1].image[0, -1]) == (
        255,
        255,
        255,
    )


def test_missing_images_fail_before_any_work_and_corrupt_ones_name_the_file(tmp_path):
    images, annotations = write_tiny_coco(tmp_path)
    (images / "2.png").unlink()
    with pytest.raises(DatasetError, match=r"1 of the 2 annotated images are not in .*\(2\.png\)"):
        RegionDataset(images, annotations)
    (images / "2.png").write_bytes(b"not a picture")
    data = RegionDataset(images, annotations)
    with pytest.raises(DatasetError, match=r"2\.png: not a recognised image format \(image id 2\)"):
        list(data)


def test_dataset_reads_sizes_the_file_leaves_out_and_names_malformed_entries(tmp_path):
    images, annotations = write_tiny_coco(tmp_path, exif_rotate=True)
    coco = json.loads(annotations.read_text())
    for image in coco["images"]:
        del image["height"], image["width"]
    annotations.write_text(json.dumps(coco))
    items = list(RegionDataset(images, annotations))
    # the EXIF-rotated JPEG is stored 20 wide, 30 high and displayed 30 x 20, like the PNG
    assert [i.image.shape for i in items] == [(20, 30, 3), (20, 30, 3)]
    assert [i.masks.shape[1:] for i in items] == [(20, 30), (20, 30)]
    del coco["annotations"][2]["image_id"]
    annotations.write_text(json.dumps(coco))
    with pytest.raises(DatasetError, match=r"annotations entry #2 has no 'image_id'"):
        RegionDataset(images, annotations)


def test_category_colours_come_from_a_field_or_a_leading_colour_word():
    assert category_colour({"name": "star", "colour": "red"}) == "red"
    assert category_colour({"name": "star", "color": "teal"}) == "teal"
    assert category_colour({"name": "Blue  ring"}) == "blue"
    assert category_colour({"name": "light_blue_ring"}) is None  # "light" is not a colour
    assert category_colour({"name": "orange"}) is None  # one word: COCO's fruit
    assert category_colour({"name": "traffic_light"}) is None


def test_expression_files_world_and_refcoco_formats(tmp_path):
    images, annotations = write_tiny_coco(tmp_path)
    world = tmp_path / "world.json"
    world.write_text(
        json.dumps(
            [
                {"ann_id": 11, "image_id": 1, "sentences": ["the dog", "the left dog"]},
                {"ann_id": 14, "image_id": 1, "sentences": ["a speck"]},  # tiny: dropped
            ]
        )
    )
    refs = tmp_path / "refs.json"
    refs.write_text(
        json.dumps(
            [
                {"ref_id": 1, "ann_id": 12, "image_id": 1, "split": "val",
                 "sentences": [{"sent": "light on the right", "raw": "Light on the right."}]},
                {"ref_id": 2, "ann_id": 12, "image_id": 1, "split": "val",
                 "sentences": [{"sent": "the  lamp"}]},
                {"ref_id": 3, "ann_id": 21, "image_id": 2, "split": "testA",
                 "sentences": [{"sent": "top band"}]},
            ]
        )
    )  # fmt: skip
    assert load_expressions(world) == {11: ["the dog", "the left dog"], 14: ["a speck"]}
    assert load_expressions(refs) == {12: ["light on the right", "the lamp"], 21: ["top band"]}
    assert load_expressions(refs, split="val") == {12: ["light on the right", "the lamp"]}

    first = next(iter(RegionDataset(images, annotations, world)))
    assert first.expressions == [["the dog", "the left dog"], []]
    data = RegionDataset(images, annotations, refs, split="val", require_expressions=True)
    items = list(data)
    assert [i.image_id for i in items] == [1]
    assert items[0].expressions == [[], ["light on the right", "the lamp"]]


def test_dataset_errors_are_clear(tmp_path):
    images, annotations = write_tiny_coco(tmp_path)
    with pytest.raises(DatasetError, match="not found"):
        RegionDataset(images, tmp_path / "missing.json")
    with pytest.raises(DatasetError, match="images folder not found"):
        RegionDataset(tmp_path / "nope", annotations)
    empty = tmp_path / "empty.json"
    coco = json.loads(annotations.read_text())
    coco["annotations"] = [a for a in coco["annotations"] if a["iscrowd"]]
    empty.write_text(json.dumps(coco))
    with pytest.raises(DatasetError, match="no image"):
        RegionDataset(images, empty)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image_id": 1}]))
    with pytest.raises(DatasetError, match="ann_id"):
        load_expressions(bad)


def test_real_coco_subset_loads(coco_tiny):
    data = RegionDataset(
        coco_tiny / "val2017", coco_tiny / "annotations" / "instances_val2017.json", limit=3
    )
    assert len(data.class_names) == 80 and "traffic light" in data.class_names
    for item in data:
        assert item.masks.shape[1:] == item.image.shape[:2]
        assert item.masks.reshape(item.num_masks, -1).sum(1).min() >= data.min_area


# ---------------------------------------------------------------------- runner, report, CLI


def test_runner_end_to_end_on_a_tiny_world(world_dir, tiny_backbone_f32, tmp_path):
    data = RegionDataset.from_world(world_dir)
    specs = [
        EmbedderSpec("global"),
        EmbedderSpec("crop"),
        EmbedderSpec("maskinversion", {"steps": 1}),
    ]
    specs.append(expression_variant(specs[2], alpha=5.0))
    result = run_eval(data, tiny_backbone_f32, specs, progress=False)

    expected = {
        ("classes", "acc@1"),
        ("classes", "acc@5"),
        ("retrieval", "mAP"),
        ("retrieval", "acc@1"),
        ("expressions", "acc@1"),
        ("grounding", "acc@1"),
    }
    ambiguous = np.concatenate([colour_ambiguous(i.labels, data.class_colours) for i in data])
    if ambiguous.any():
        expected.add(("classes (same colour)", "acc@1"))
    for label in ("global", "crop", "maskinversion"):
        assert {(r["task"], r["metric"]) for r in result.rows if r["embedder"] == label} == expected
    variant = [r for r in result.rows if r["embedder"] == "maskinversion (alpha=5)"]
    assert {r["task"] for r in variant} == {"expressions", "grounding"}
    assert all(0.0 <= r["value"] <= 1.0 and r["n"] > 0 for r in result.rows)
    assert result.counts["images"] == 3 and result.counts["classes"] == 64
    assert all(r["n"] == result.counts["masks"] for r in result.rows if r["task"] == "classes")
    classes_present = len({int(c) for item in data for c in item.labels})
    retrieval = [r for r in result.rows if r["task"] == "retrieval"]
    assert retrieval and all(r["n"] == classes_present for r in retrieval)
    grounding = [r for r in result.rows if r["task"] == "grounding"]
    assert all(r["n"] == result.counts["sentences"] for r in grounding)
    global_vectors = result.runs[0].embeddings[0]  # one image: every mask gets the same vector
    assert global_vectors.shape[1] == tiny_backbone_f32.embed_dim
    assert torch.allclose(global_vectors, global_vectors[:1].expand_as(global_vectors))

    path = write_json(result.rows, tmp_path / "rows.json")
    saved = json.loads(path.read_text())
    assert all(set(r) == set(ROW_KEYS) | set(TIMING_KEYS) for r in saved)
    assert all(list(r)[: len(ROW_KEYS)] == list(ROW_KEYS) for r in saved)
    assert read_json(path)[0]["value"] == pytest.approx(result.rows[0]["value"])
    png = bar_chart(result.rows, tmp_path / "chart.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = markdown_table(result.rows)
    assert len(table.splitlines()) == 2 + 4  # header, rule, 4 embedders
    assert "**" in table and "maskinversion (alpha=5) | – | – |" in table


def test_colour_ambiguity_and_pointing_game_by_hand():
    colours = ["red", "red", "blue", None]
    assert colour_ambiguous([0, 1, 2], colours).tolist() == [True, True, False]
    assert colour_ambiguous([3, 3, 2], colours).tolist() == [False, False, False]
    masks = np.zeros((3, 4, 6), dtype=bool)
    masks[0, :2, :2] = masks[1, :2, 4:] = masks[2, 3, :] = True
    maps = np.zeros((3, 4, 6))
    maps[0, :2, :2] = 1.0  # densest on its own mask
    maps[1, :2, :2] = 1.0  # densest on mask 0: a miss
    maps[1, :2, 4:] = 0.5
    maps[2] = 0.2
    maps[2, 3, :3] = 1.0  # half of mask 2 hot: mean 0.6, the others 0.2
    hits, scored = pointing_hits(maps, masks, [5, 6, 7])
    assert hits.tolist() == [True, False, True] and scored.all()
    # A duplicated class has no right answer: both of its masks are skipped.
    hits, scored = pointing_hits(maps, masks, [5, 5, 7])
    assert scored.tolist() == [False, False, True] and hits.tolist() == [True]
    with pytest.raises(ValueError, match="maps and masks"):
        pointing_hits(maps[:2], masks, [1, 2, 3])


def test_pointing_rows_on_a_tiny_world(world_dir, tiny_backbone_f32):
    data = RegionDataset.from_world(world_dir)
    result = run_eval(
        data, tiny_backbone_f32, [EmbedderSpec("global")], ["pointing"], progress=False
    )
    rows = {r["task"]: r for r in result.rows if r["embedder"] == POINTING_LABEL}
    unique = sum(int((np.asarray(i.labels) == c).sum() == 1) for i in data for c in i.labels)
    assert rows["pointing"]["n"] == unique and 0.0 <= rows["pointing"]["value"] <= 1.0
    assert not [r for r in result.rows if r["embedder"] == "global"]


def test_markdown_bolds_the_best_of_each_column():
    rows = [
        {"dataset": "d", "model": "m", "embedder": e, "task": "classes", "metric": "acc@1",
         "value": v, "n": 4, "seconds_per_image": t, "seconds_per_mask": t / 4}
        for e, v, t in (("a", 0.25, 2.0), ("b", 0.75, 1.0), ("c", 0.75, 3.0))
    ]  # fmt: skip
    lines = markdown_table(rows).splitlines()
    assert lines[2] == "| a | 25.0 | 2.000 | 500.0 |"
    assert lines[3] == "| b | **75.0** | **1.000** | **250.0** |"
    assert lines[4] == "| c | **75.0** | 3.000 | 750.0 |"


def test_text_cache_encodes_each_text_once(tiny_backbone_f32):
    cache = TextCache(tiny_backbone_f32)
    first = cache.encode(["a dog", "a cat", "a dog"], None)
    assert len(cache) == 2 and torch.equal(first[0], first[2])
    again = cache.encode(["a cat"], None)
    assert torch.equal(again[0], first[1]) and len(cache) == 2
    templated = cache.encode(["dog"], ("a photo of a {}.",))
    assert templated.shape == (1, tiny_backbone_f32.embed_dim) and len(cache) == 3


def test_embedder_names_are_checked():
    assert parse_embedders("all")[0] == "maskinversion" and len(parse_embedders("all")) == 8
    assert parse_embedders("crop, global,crop") == ["crop", "global"]
    with pytest.raises(EvalError, match=r"unknown embedder.*sam-clip"):
        parse_embedders("crop,sam-clip")
