"""The indexing pipeline: incremental runs, failures, EXIF, mask sources, dry run (crash safety:
tests/test_indexer_crash.py).

Everything runs on a tiny random-weight ViT written as a ``local-dir:`` model (loaded through the
Python API or the CLI), small images in ``tmp_path`` and a cheap embedder.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
import typer
from indexer_helpers import (
    CountingEmbedder,
    StripeMasks,
    expected_regions,
    live_regions,
    make_photos,
    open_index,
    run,
    write_image,
)
from PIL import Image
from store_fixtures import assert_consistent
from typer.testing import CliRunner

from regionsearch.cli.index import register
from regionsearch.embedders import get_embedder
from regionsearch.image_io import ImageDecodeError
from regionsearch.indexer import Indexer, build_plan, decode_image
from regionsearch.masks import CocoAnnotationSource
from regionsearch.store import IndexMismatchError

pytestmark = pytest.mark.usefixtures("faiss_single_thread")


# ----------------------------------------------------------------------------- decode / scan


def test_decode_rejects_broken_files_with_reasons(tmp_path):
    good = write_image(tmp_path / "ok.jpg", 0)
    data = good.read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("hello")
    assert decode_image(good).pixels.shape == (32, 40, 3)
    for name, words in [("trunc.jpg", "truncated"), ("empty.png", "empty"), ("text.png", "not")]:
        with pytest.raises(ImageDecodeError, match=words):
            decode_image(tmp_path / name)


def test_decode_rejects_decompression_bombs(tmp_path, monkeypatch):
    path = write_image(tmp_path / "big.png", 0)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageDecodeError, match="too many pixels"):
        decode_image(path)


def test_exif_orientation_is_applied(tmp_path):
    im = Image.fromarray(np.zeros((20, 40, 3), np.uint8))  # 40 wide, 20 high
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    im.save(tmp_path / "rot.jpg", exif=exif)
    decoded = decode_image(tmp_path / "rot.jpg")
    assert (decoded.width, decoded.height) == (20, 40)


def test_walk_is_recursive_and_case_insensitive(tmp_path):
    paths = make_photos(tmp_path / "photos", 6)
    plan = build_plan(tmp_path / "photos", None)
    assert sorted(i.entry.rel for i in plan.new) == sorted(
        p.relative_to(tmp_path / "photos").as_posix() for p in paths
    )


# ----------------------------------------------------------------------------- incremental runs


def test_incremental_runs(tmp_path, backbone):
    root = tmp_path / "photos"
    paths = make_photos(root, 6)
    embedder = CountingEmbedder(get_embedder("masked-crop", backbone))
    with open_index(tmp_path, backbone, "masked-crop") as index:
        first = run(index, backbone, embedder, root=root)
        assert first.images_indexed == 6 and first.images_failed == 0
        assert first.regions_indexed == sum(expected_regions(p) for p in paths)
        assert embedder.calls == 6
        assert_consistent(index)
        assert index.manifest.image_root == str(root.resolve())

        # unchanged folder: no embedding, no hashing, fast
        t = time.perf_counter()
        second = run(index, backbone, embedder, root=root)
        assert time.perf_counter() - t < 2.0
        assert embedder.calls == 6 and second.images_indexed == 0
        assert second.plan["unchanged"] == 6 and second.plan["hashed"] == 0

        # touch one file (same bytes): hashed, not re-embedded
        st = paths[0].stat()
        os.utime(paths[0], ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
        third = run(index, backbone, embedder, root=root)
        assert embedder.calls == 6 and third.plan["touched"] == 1 and third.plan["hashed"] == 1
        assert run(index, backbone, embedder, root=root).plan["hashed"] == 0  # stat recorded

        # modify one file: only it is re-indexed, old regions tombstoned, no duplicates
        rel = paths[1].relative_to(root).as_posix()
        old_ids = {r.id for r in live_regions(index)[rel]}
        write_image(paths[1], 99)
        fourth = run(index, backbone, embedder, root=root)
        assert embedder.calls == 7 and fourth.images_indexed == 1
        new = live_regions(index)[rel]
        assert len(new) == expected_regions(paths[1]) and not old_ids & {r.id for r in new}
        assert not index.vectors.contains(np.array(sorted(old_ids))).any()
        assert_consistent(index)

        # delete a file: its regions leave SQL and FAISS
        rel2 = paths[2].relative_to(root).as_posix()
        gone = [r.id for r in live_regions(index)[rel2]]
        paths[2].unlink()
        fifth = run(index, backbone, embedder, root=root)
        assert fifth.images_deleted == 1 and fifth.regions_deleted == len(gone)
        assert index.get_image(rel2).status == "deleted"
        assert index.fetch_regions(gone) == []
        assert not index.vectors.contains(np.array(gone)).any()
        assert_consistent(index)
        stats = index.stats()
        assert stats.images["indexed"] == 5 and stats.images["deleted"] == 1
        assert stats.regions == sum(expected_regions(p) for p in paths if p.exists())


def test_broken_files_are_reported_and_skipped(tmp_path, backbone):
    root = tmp_path / "photos"
    make_photos(root, 3)
    data = (root / "p00.jpg").read_bytes()
    (root / "trunc.jpg").write_bytes(data[: len(data) // 3])
    (root / "zero.png").write_bytes(b"")
    (root / "fake.webp").write_text("not an image at all")
    (root / "bad.tif").write_bytes(b"II*\x00" + os.urandom(64))
    embedder = CountingEmbedder(get_embedder("global", backbone))
    with open_index(tmp_path, backbone, "global") as index:
        report = run(index, backbone, embedder, root=root, workers=2)
        assert report.images_indexed == 3
        failed = dict(report.failures)
        assert set(failed) == {"trunc.jpg", "zero.png", "fake.webp", "bad.tif"}
        assert all(reason.startswith("decode:") for reason in failed.values())
        assert index.get_image("zero.png").status == "failed"
        assert "empty" in index.get_image("zero.png").error
        # unchanged broken files are not retried (unless asked), changed ones are
        again = run(index, backbone, embedder, root=root)
        assert again.images_failed == 0 and again.plan["failed_skipped"] == 4
        assert dict(again.summary_rows())["failed before"].startswith("4 (")  # still shown
        assert run(index, backbone, embedder, root=root, retry_failed=True).images_failed == 4
        write_image(root / "zero.png", 5)
        fixed = run(index, backbone, embedder, root=root)
        assert fixed.images_indexed == 1 and index.get_image("zero.png").status == "indexed"
        assert_consistent(index)


def test_exif_rotated_jpeg_stores_transposed_size(tmp_path, backbone):
    root = tmp_path / "photos"
    root.mkdir()
    im = Image.fromarray(np.full((20, 40, 3), 90, np.uint8))
    exif = im.getexif()
    exif[0x0112] = 8
    im.save(root / "rot.jpg", exif=exif)
    with open_index(tmp_path, backbone, "global") as index:
        run(index, backbone, get_embedder("global", backbone), root=root)
        rec = index.get_image("rot.jpg")
        assert (rec.width, rec.height) == (20, 40)
        assert index.regions_of_image(rec.id)[0].rle["size"] == [40, 20]


def test_coco_annotations_give_one_region_per_annotation(tmp_path, backbone):
    root = tmp_path / "photos"
    paths = [write_image(root / f"c{i}.jpg", i, size=(48, 36)) for i in range(3)]
    images, anns = [], []
    for i, p in enumerate(paths):
        images.append({"id": i + 1, "file_name": p.name, "width": 48, "height": 36})
        for k in range(i + 1):
            x = 2 + 10 * k
            poly = [x, 2, x + 8, 2, x + 8, 30, x, 30]
            anns.append(
                {
                    "id": 100 * i + k,
                    "image_id": i + 1,
                    "category_id": 1 + k % 2,
                    "segmentation": [poly],
                    "area": 8 * 28,
                    "bbox": [x, 2, 8, 28],
                    "iscrowd": 0,
                }
            )
    cats = [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
    ann_file = tmp_path / "instances.json"
    ann_file.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    with open_index(tmp_path, backbone, "masked-crop") as index:
        report = run(
            index,
            backbone,
            get_embedder("masked-crop", backbone),
            CocoAnnotationSource(ann_file),
            root=root,
        )
        assert report.regions_indexed == len(anns) and report.images_failed == 0
        regions = live_regions(index)
        for i, p in enumerate(paths):
            got = regions[p.name]
            assert len(got) == i + 1
            assert {r.external_id for r in got} == {str(100 * i + k) for k in range(i + 1)}
            assert all(r.source == "coco" and r.category in ("cat", "dog") for r in got)


def test_automatic_proposals_and_maskinversion(tmp_path, backbone):
    from regionsearch.masks import AutomaticProposals

    root = tmp_path / "photos"
    write_image(root / "a.png", 1, size=(64, 48))
    write_image(root / "b.jpg", 2, size=(48, 64))
    embedder = get_embedder("maskinversion", backbone, steps=1)
    with open_index(tmp_path, backbone, "maskinversion") as index:
        report = run(
            index,
            backbone,
            embedder,
            AutomaticProposals(max_regions=4),
            root=root,
            executor="process",
            workers=1,
        )
        assert report.images_indexed == 2 and 2 <= report.regions_indexed <= 8
        assert_consistent(index)


def test_no_masks_means_failed(tmp_path, backbone):
    class NoMasks:
        def masks_for(self, image_path, image):
            return []

    root = tmp_path / "photos"
    make_photos(root, 2)
    with open_index(tmp_path, backbone, "global") as index:
        report = run(index, backbone, get_embedder("global", backbone), NoMasks(), root=root)
        assert report.images_failed == 2 and all("no regions" in r for _, r in report.failures)


def test_manifest_mismatch_is_refused(tmp_path, backbone):
    with (
        open_index(tmp_path, backbone, "global") as index,
        pytest.raises(IndexMismatchError, match="masked-crop"),
    ):
        Indexer(index, backbone, get_embedder("masked-crop", backbone), StripeMasks())
    with pytest.raises(IndexMismatchError, match="embedder"):
        open_index(tmp_path, backbone, "masked-crop")


# ----------------------------------------------------------------------------- CLI


@pytest.fixture
def cli_app():
    app = typer.Typer()
    register(app)
    return app


def test_cli_index_dry_run_stats_and_mismatch(tmp_path, model_dir, cli_app):
    root = tmp_path / "photos"
    make_photos(root, 3)
    pngs = tmp_path / "masks"
    for i, p in enumerate(sorted(root.rglob("p*"))):
        label = np.zeros((32, 40), np.uint8)
        label[:, : 10 * (i + 1)] = 1
        label[:5, 35:] = 2
        pngs.mkdir(exist_ok=True)
        Image.fromarray(label).save(pngs / f"{p.stem}.png")
    base = ["--index-dir", str(tmp_path / "indexes"), "--name", "t"]
    common = [*base, "--model", f"local-dir:{model_dir}", "-e", "global", "--masks", str(pngs)]
    runner = CliRunner()

    dry = runner.invoke(cli_app, ["index", str(root), *base, "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "new" in dry.output and "p00.jpg" in dry.output
    assert not (tmp_path / "indexes" / "t").exists()  # nothing written

    res = runner.invoke(cli_app, ["index", str(root), *common, "--no-progress", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["images_indexed"] == 3 and report["regions_indexed"] == 6

    dry = runner.invoke(cli_app, ["index", str(root), *base, "--dry-run", "--json"])
    assert json.loads(dry.output)["counts"]["unchanged"] == 3

    st = runner.invoke(cli_app, ["stats", *base, "--json"])
    assert st.exit_code == 0, st.output
    stats = json.loads(st.output)
    assert stats["images"]["indexed"] == 3 and stats["regions"] == 6 and stats["vectors"] == 6
    assert stats["embedder_options"] == {"resolution": 32, "batch_size": 32}
    shown = runner.invoke(cli_app, ["stats", *base]).output
    assert "regions" in shown and "batch_size=32, resolution=32" in shown

    bad = [*base, "--model", f"local-dir:{model_dir}", "-e", "masked-crop", "--masks", str(pngs)]
    res = runner.invoke(cli_app, ["index", str(root), *bad])
    assert res.exit_code == 1  # the index exists with other options: a runtime error
    err = res.stderr if hasattr(res, "stderr") else res.output
    lines = [line for line in err.splitlines() if line.startswith("error:")]  # + stage lines
    assert len(lines) == 1 and lines[0].startswith("error: Index 't'") and "--name" in lines[0]
    assert "Traceback" not in err

    missing = runner.invoke(cli_app, ["stats", "--index-dir", str(tmp_path), "--name", "nope"])
    assert missing.exit_code == 1 and "error:" in missing.stderr
    usage = runner.invoke(cli_app, ["stats", "--index-dir", str(tmp_path), "--name", ".."])
    assert usage.exit_code == 2 and "invalid index name" in usage.stderr
