"""Search layer of the app features: masks sent by clients, and ``regionsearch.refer`` (one
call, no index) against ``RegionSearcher.refer`` on the same photo once indexed."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from test_api_apps import EXPR, photo_bytes
from test_search import tiny_backbone

import regionsearch
from regionsearch.errors import InvalidMaskError
from regionsearch.search import RegionSearcher
from regionsearch.search.query_masks import as_masks, mask_from_box, mask_from_png, mask_from_rle
from regionsearch.store import RegionIndex

HW = (48, 64)


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format="PNG")
    return buf.getvalue()


def test_box_masks_cover_the_pixels_they_touch_clipped() -> None:
    mask = mask_from_box([10.5, 4, 5, 3.2], HW)
    rows, cols = np.nonzero(mask)
    assert (cols.min(), cols.max(), rows.min(), rows.max()) == (10, 15, 4, 7)
    edge = mask_from_box([-5, -5, 10, 10], HW)
    assert edge.sum() == 25 and edge[0, 0]
    for bad, words in (([1, 2, 3], "four numbers"), ([0, 0, -1, 4], "positive"),
                       ([70, 0, 4, 4], "outside"), ("1,2,3,4", "four numbers"),
                       ([0, 0, float("nan"), 1], "four numbers")):  # fmt: skip
        with pytest.raises(InvalidMaskError, match=words):
            mask_from_box(bad, HW)


def test_png_masks_use_alpha_when_present() -> None:
    grey = np.zeros(HW, np.uint8)
    grey[5:9, 6:12] = 200
    assert mask_from_png(_png(grey), HW).sum() == 24
    rgba = np.zeros((*HW, 4), np.uint8)
    rgba[..., :3] = 255  # white everywhere, opaque only in a block
    rgba[10:20, 10:15, 3] = 255
    assert mask_from_png(_png(rgba, "RGBA"), HW).sum() == 50
    with pytest.raises(InvalidMaskError, match="empty"):
        mask_from_png(_png(np.zeros(HW, np.uint8)), HW)
    with pytest.raises(InvalidMaskError, match="64x48"):
        mask_from_png(_png(np.ones((48, 64), np.uint8)), (64, 48))
    with pytest.raises(InvalidMaskError, match="not an image"):
        mask_from_png(b"nope", HW)


def test_rle_masks_round_trip_and_errors() -> None:
    from regionsearch.masks import rle as rle_mod

    mask = np.zeros(HW, bool)
    mask[3:9, 20:30] = True
    assert np.array_equal(mask_from_rle(rle_mod.encode(mask), HW), mask)
    with pytest.raises(InvalidMaskError, match="COCO RLE object"):
        mask_from_rle([1, 2], HW)
    with pytest.raises(InvalidMaskError, match="size"):
        mask_from_rle({"size": [48], "counts": ""}, HW)
    stacked = as_masks([rle_mod.encode(mask), mask.astype(np.uint8)], HW)
    assert stacked.shape == (2, *HW) and stacked.dtype == bool
    assert np.array_equal(as_masks(mask, HW)[0], mask)
    with pytest.raises(InvalidMaskError, match="empty"):
        as_masks([], HW)


@pytest.fixture(scope="module")
def indexed(tmp_path_factory: pytest.TempPathFactory):
    """The photo indexed by the indexer itself (automatic proposals, masked-crop)."""
    from regionsearch.embedders import get_embedder
    from regionsearch.indexer.pipeline import Indexer
    from regionsearch.masks import AutomaticProposals

    root = tmp_path_factory.mktemp("refer")
    photos = root / "photos"
    photos.mkdir()
    (photos / "p.png").write_bytes(photo_bytes())
    backbone = tiny_backbone()
    index = RegionIndex.create(
        root / "index", model=backbone.name, embedder="masked-crop", dimension=backbone.embed_dim
    )
    embedder = get_embedder("masked-crop", backbone)
    Indexer(index, backbone, embedder, AutomaticProposals(), workers=0, progress=False).run(photos)
    yield index, embedder, photos / "p.png"
    index.close()


def test_python_refer_equals_indexed_refer(indexed) -> None:
    index, embedder, path = indexed
    record = index.get_image("p.png")
    expected = RegionSearcher(index, embedder.backbone).refer(record.id, EXPR, k=4)
    stored = [r.rle for r in index.regions_of_image(record.id)]
    pixels = np.asarray(Image.open(path).convert("RGB"))
    for image, masks in ((path, None), (pixels, stored), (Image.open(path), None)):
        found = regionsearch.refer(image, EXPR, masks, embedder=embedder, k=4)
        assert found.candidates == len(stored)
        assert [r.rle for r in found.regions] == [h.rle for h in expected.hits]
        np.testing.assert_allclose(
            [r.score for r in found.regions], [h.score for h in expected.hits], atol=1e-5
        )
        assert found.best.bbox == expected.best.bbox
        assert found.best.mask().sum() == expected.best.area


def test_python_refer_builds_the_embedder_from_names(indexed) -> None:
    _, embedder, path = indexed
    by_name = regionsearch.refer(path, EXPR, model=embedder.backbone, embedder="masked-crop", k=2)
    by_object = regionsearch.refer(path, EXPR, embedder=embedder, k=2)
    assert [r.rle for r in by_name.regions] == [r.rle for r in by_object.regions]
    with pytest.raises(ValueError, match="empty expression"):
        regionsearch.refer(path, "  ", embedder=embedder)
    with pytest.raises(InvalidMaskError):
        regionsearch.refer(path, EXPR, [np.zeros((5, 5), bool)], embedder=embedder)


def test_cli_similar(tmp_path_factory: pytest.TempPathFactory, monkeypatch) -> None:
    import json

    from test_search import build_demo_index
    from typer.testing import CliRunner

    import regionsearch.cli.search as search_cli
    from regionsearch.cli import app
    from regionsearch.search.examples import similar

    demo = build_demo_index(tmp_path_factory.mktemp("cli-similar"))
    monkeypatch.setattr(search_cli, "load_backbone", lambda *a, **k: demo.backbone)
    runner = CliRunner()
    rid = int(demo.ids[7])
    where = ["--name", str(demo.directory)]
    res = runner.invoke(app, ["similar", str(rid), *where, "--k", "4", "--json"])
    assert res.exit_code == 0, res.output
    got = [r["region_id"] for r in json.loads(res.stdout)["results"]]
    index = RegionIndex.open(demo.directory, read_only=True)
    try:
        assert got == [h.region_id for h in similar(RegionSearcher(index, demo.backbone), rid, 4)]
    finally:
        index.close()
    assert rid not in got and len(got) == 4
    table = runner.invoke(app, ["similar", str(rid), *where])
    assert table.exit_code == 0 and str(got[0]) in table.stdout
    missing = runner.invoke(app, ["similar", "424242", *where])
    assert missing.exit_code != 0
    assert "not in index" in missing.output + str(missing.exception)
