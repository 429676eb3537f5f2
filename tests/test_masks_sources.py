"""Mask sources: COCO annotations (tiny JSON and, if present, coco-tiny) and PNG folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from regionsearch.masks import (
    AutomaticProposals,
    CocoAnnotationSource,
    MaskSource,
    PngMaskSource,
    RegionProposal,
    rle,
)

COCO_TINY = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "coco-tiny"

H, W = 20, 30


def crowd_mask() -> np.ndarray:
    m = np.zeros((H, W), dtype=bool)
    m[12:18, 3:25] = True
    return m


def uncompressed(mask: np.ndarray) -> dict:
    """COCO crowd-style RLE: counts as a list of column-major run lengths."""
    flat = mask.ravel(order="F")
    change = np.flatnonzero(np.diff(flat.astype(np.int8))) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat[0]:
        runs = [0, *runs]
    return {"size": [H, W], "counts": runs}


@pytest.fixture
def tiny_coco(tmp_path: Path) -> Path:
    box = np.zeros((H, W), dtype=bool)
    box[2:6, 20:28] = True
    data = {
        "images": [
            {"id": 7, "file_name": "a.jpg", "height": H, "width": W},
            {"id": 9, "file_name": "sub/b.jpg", "height": H, "width": W},
        ],
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
        "annotations": [
            {  # polygon, two parts
                "id": 100,
                "image_id": 7,
                "category_id": 1,
                "iscrowd": 0,
                "segmentation": [[1, 1, 8, 1, 8, 8, 1, 8], [10, 1, 14, 1, 14, 4, 10, 4]],
            },
            {  # compressed RLE
                "id": 101,
                "image_id": 7,
                "category_id": 2,
                "iscrowd": 0,
                "segmentation": rle.encode(box),
            },
            {  # crowd, uncompressed RLE
                "id": 102,
                "image_id": 7,
                "category_id": 1,
                "iscrowd": 1,
                "segmentation": uncompressed(crowd_mask()),
            },
        ],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path


def test_region_proposal_validates() -> None:
    p = RegionProposal(np.eye(3, dtype=np.uint8), source="png")
    assert p.mask.dtype == bool and p.area == 3 and p.score == 1.0
    np.testing.assert_array_equal(rle.decode(p.to_rle()), np.eye(3, dtype=bool))
    with pytest.raises(ValueError, match="unknown source"):
        RegionProposal(np.eye(3, dtype=bool), source="magic")
    with pytest.raises(ValueError, match="2-D"):
        RegionProposal(np.zeros((2, 2, 2), dtype=bool), source="png")


def test_sources_satisfy_the_protocol(tiny_coco: Path, tmp_path: Path) -> None:
    assert isinstance(CocoAnnotationSource(tiny_coco), MaskSource)
    assert isinstance(PngMaskSource(tmp_path), MaskSource)
    assert isinstance(AutomaticProposals(), MaskSource)


def test_coco_source_polygon_rle_and_crowd(tiny_coco: Path) -> None:
    source = CocoAnnotationSource(tiny_coco)
    regions = source.masks_for(Path("/photos/a.jpg"), np.zeros((H, W, 3), np.uint8))
    assert [r.annotation_id for r in regions] == [100, 101, 102]
    assert [r.category for r in regions] == ["cat", "dog", "cat"]
    assert all(r.source == "coco" and r.mask.shape == (H, W) for r in regions)
    polygon = regions[0].mask
    assert polygon[4, 4] and polygon[2, 12] and not polygon[4, 12] and not polygon[15, 4]
    assert regions[1].mask[3, 24] and regions[1].mask.sum() == 4 * 8
    np.testing.assert_array_equal(regions[2].mask, crowd_mask())


def test_coco_source_lookup_by_id_and_nested_file_name(tiny_coco: Path) -> None:
    source = CocoAnnotationSource(tiny_coco, include_crowd=False)
    assert [r.annotation_id for r in source.masks_for_id(7)] == [100, 101]
    assert source.image_id("sub/b.jpg") == 9
    assert source.masks_for(Path("elsewhere/b.jpg"), None) == []
    assert source.file_names == ["a.jpg", "sub/b.jpg"]


def test_coco_source_errors(tiny_coco: Path, tmp_path: Path) -> None:
    source = CocoAnnotationSource(tiny_coco)
    with pytest.raises(KeyError, match=r"missing\.jpg"):
        source.masks_for(Path("missing.jpg"), np.zeros((H, W, 3), np.uint8))
    with pytest.raises(KeyError):
        source.masks_for_id(12345)
    with pytest.raises(ValueError, match=r"40x20 \(WxH\).*says 30x20"):
        source.masks_for(Path("a.jpg"), np.zeros((H, 40, 3), np.uint8))
    with pytest.raises(FileNotFoundError, match="not found"):
        CocoAnnotationSource(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not a JSON"):
        CocoAnnotationSource(bad)
    bad.write_text(json.dumps({"images": []}))
    with pytest.raises(ValueError, match="not a COCO instances file"):
        CocoAnnotationSource(bad)


def test_coco_source_names_malformed_entries(tiny_coco: Path, tmp_path: Path) -> None:
    data = json.loads(tiny_coco.read_text())
    bad = tmp_path / "bad.json"
    for section, key in (("annotations", "category_id"), ("categories", "name")):
        broken = json.loads(json.dumps(data))
        del broken[section][1][key]
        bad.write_text(json.dumps(broken))
        with pytest.raises(ValueError, match=rf"{section} entry #1 has no '{key}'"):
            CocoAnnotationSource(bad)
    data["images"].append(dict(data["images"][0], file_name="again.jpg"))
    bad.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="image id 7 appears twice"):
        CocoAnnotationSource(bad)


def test_coco_source_takes_the_size_from_the_image_when_the_file_has_none(
    tiny_coco: Path, tmp_path: Path
) -> None:
    data = json.loads(tiny_coco.read_text())
    for image in data["images"]:
        del image["height"], image["width"]
    sizeless = tmp_path / "sizeless.json"
    sizeless.write_text(json.dumps(data))
    with_size = CocoAnnotationSource(tiny_coco).masks_for(Path("a.jpg"), np.zeros((H, W, 3)))
    without = CocoAnnotationSource(sizeless).masks_for(Path("a.jpg"), np.zeros((H, W, 3)))
    assert len(without) == len(with_size) == 3
    assert all(np.array_equal(a.mask, b.mask) for a, b in zip(with_size, without, strict=True))
    with pytest.raises(ValueError, match="no height/width for image id 7"):
        CocoAnnotationSource(sizeless).masks_for_id(7)


@pytest.mark.skipif(not COCO_TINY.is_dir(), reason="coco-tiny not available")
def test_coco_source_on_coco_tiny() -> None:
    ann_file = COCO_TINY / "annotations" / "instances_val2017.json"
    data = json.loads(ann_file.read_text())
    source = CocoAnnotationSource(ann_file)
    crowd = next(a for a in data["annotations"] if a["iscrowd"])
    image = next(im for im in data["images"] if im["id"] == crowd["image_id"])
    path = COCO_TINY / "val2017" / image["file_name"]
    with Image.open(path) as im:
        pixels = np.asarray(im.convert("RGB"))
    regions = source.masks_for(path, pixels)
    anns = [a for a in data["annotations"] if a["image_id"] == image["id"]]
    assert [r.annotation_id for r in regions] == [a["id"] for a in anns]
    names = {c["id"]: c["name"] for c in data["categories"]}
    assert [r.category for r in regions] == [names[a["category_id"]] for a in anns]
    for region, ann in zip(regions, anns, strict=True):
        assert region.mask.shape == pixels.shape[:2]
        # Rasterised area agrees with COCO's own area (exact for RLE, close for polygons).
        assert region.area == pytest.approx(ann["area"], rel=0.15, abs=30)
        x, y, w, h = ann["bbox"]
        ys, xs = np.nonzero(region.mask)
        assert abs(xs.min() - x) <= 1.5 and abs(ys.min() - y) <= 1.5
        assert abs(xs.max() + 1 - (x + w)) <= 1.5 and abs(ys.max() + 1 - (y + h)) <= 1.5
    non_crowd = CocoAnnotationSource(ann_file, include_crowd=False).masks_for(path, pixels)
    assert len(non_crowd) == sum(1 for a in anns if not a["iscrowd"]) < len(regions)


def save_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_png_source_per_instance_folder(tmp_path: Path) -> None:
    first = np.zeros((H, W), np.uint8)
    first[2:5, 3:9] = 255
    second = np.zeros((H, W), np.uint8)
    second[10:15, 20:22] = 1
    save_png(tmp_path / "photo" / "b.png", first)
    save_png(tmp_path / "photo" / "a.png", second)
    save_png(tmp_path / "photo" / "c.png", np.zeros((H, W), np.uint8))  # empty: skipped
    (tmp_path / "photo" / "notes.txt").write_text("ignored")
    regions = PngMaskSource(tmp_path).masks_for(Path("x/photo.jpg"), np.zeros((H, W, 3)))
    assert len(regions) == 2
    np.testing.assert_array_equal(regions[0].mask, second > 0)  # file-name order: a, b
    np.testing.assert_array_equal(regions[1].mask, first > 0)
    assert all(r.source == "png" for r in regions)


def test_png_source_label_image(tmp_path: Path) -> None:
    labels = np.zeros((H, W), np.uint8)
    labels[1:4, 1:4] = 7
    labels[10:12, 5:25] = 3
    save_png(tmp_path / "photo.png", labels)
    regions = PngMaskSource(tmp_path).masks_for(Path("photo.jpg"), np.zeros((H, W, 3)))
    assert [r.annotation_id for r in regions] == [3, 7]
    np.testing.assert_array_equal(regions[0].mask, labels == 3)
    np.testing.assert_array_equal(regions[1].mask, labels == 7)


def test_png_source_rgb_label_image_and_both_layouts(tmp_path: Path) -> None:
    colours = np.zeros((H, W, 3), np.uint8)
    colours[0:5, 0:5] = (255, 0, 0)
    colours[0:5, 10:15] = (0, 0, 255)
    colours[10:15, 0:5] = (255, 0, 0)  # same colour = same instance
    save_png(tmp_path / "photo.png", colours)
    extra = np.zeros((H, W), np.uint8)
    extra[18:, :] = 1
    save_png(tmp_path / "photo" / "m.png", extra)
    regions = PngMaskSource(tmp_path).masks_for(Path("photo.jpg"), np.zeros((H, W, 3)))
    assert len(regions) == 3
    np.testing.assert_array_equal(regions[0].mask, extra > 0)
    assert sorted(int(r.mask.sum()) for r in regions[1:]) == [25, 50]


def test_png_source_size_mismatch_and_missing(tmp_path: Path) -> None:
    save_png(tmp_path / "photo" / "m.png", np.ones((H, W + 1), np.uint8))
    source = PngMaskSource(tmp_path)
    with pytest.raises(ValueError, match=r"m\.png.*31x20.*30x20"):
        source.masks_for(Path("photo.jpg"), np.zeros((H, W, 3)))
    assert source.masks_for(Path("other.jpg"), np.zeros((H, W, 3))) == []
    with pytest.raises(FileNotFoundError, match="mask folder"):
        PngMaskSource(tmp_path / "absent")


def test_png_source_reads_image_size_from_disk(tmp_path: Path) -> None:
    photo = tmp_path / "photos" / "p.jpg"
    photo.parent.mkdir()
    Image.new("RGB", (W, H)).save(photo)
    labels = np.zeros((H, W), np.uint8)
    labels[5, 5] = 1
    save_png(tmp_path / "masks" / "p.png", labels)
    regions = PngMaskSource(tmp_path / "masks").masks_for(photo, None)
    assert len(regions) == 1 and regions[0].mask[5, 5]
