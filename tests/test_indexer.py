"""The indexing pipeline: incremental runs, failures, EXIF, mask sources, dry run, crash safety.

Everything runs on a tiny random-weight ViT written as a ``local-dir:`` model (loaded through the
Python API or the CLI), small images in ``tmp_path`` and a cheap embedder.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

from regionsearch.backbone import Backbone
from regionsearch.backbone.tiny import tiny_loaded_model, tiny_model_cfg
from regionsearch.cli.index import register
from regionsearch.embedders import get_embedder
from regionsearch.indexer import Indexer, build_plan, decode_image
from regionsearch.indexer.decode import ImageDecodeError
from regionsearch.masks import CocoAnnotationSource, PngMaskSource, RegionProposal
from regionsearch.store import IndexMismatchError, RegionIndex

pytestmark = pytest.mark.usefixtures("faiss_one_thread")


@pytest.fixture
def faiss_one_thread():
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model") / "tiny"
    folder.mkdir()
    loaded = tiny_loaded_model(seed=0)
    config = {"model_cfg": tiny_model_cfg(), "preprocess_cfg": {"size": 32}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    torch.save(loaded.model.state_dict(), folder / "open_clip_pytorch_model.bin")
    return folder


@pytest.fixture(scope="module")
def backbone(model_dir) -> Backbone:
    return Backbone.load(f"local-dir:{model_dir}", device="cpu")


class CountingEmbedder:
    """Wraps an embedder and counts ``embed`` calls (the 'no work on re-run' assertions)."""

    def __init__(self, inner):
        self.inner = inner
        self.name = inner.name
        self.backbone = inner.backbone
        self.calls = 0

    def embed(self, image, masks):
        self.calls += 1
        return self.inner.embed(image, masks)


class StripeMasks:
    """Cheap deterministic mask source: 1 + (sum of the first pixel % 3) vertical stripes."""

    def masks_for(self, image_path, image):
        h, w = image.shape[:2]
        n = 1 + int(image[0, 0].sum()) % 3
        out = [RegionProposal(np.ones((h, w), bool), source="full-image")]
        for i in range(n):
            m = np.zeros((h, w), bool)
            m[:, i * w // n : (i + 1) * w // n] = True
            out.append(RegionProposal(m, source="proposal", score=0.5))
        return out


def expected_regions(path: Path) -> int:
    with Image.open(path) as im:
        first = np.asarray(im.convert("RGB"))[0, 0]
    return 2 + int(first.sum()) % 3


def write_image(path: Path, seed: int, size=(40, 32), fmt: str | None = None) -> Path:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    pixels[size[1] // 4 : size[1] // 2, size[0] // 4 : size[0] // 2] = rng.integers(0, 256, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def make_photos(root: Path, n: int = 6) -> list[Path]:
    exts = [".jpg", ".png", ".JPEG", ".webp", ".bmp", ".tif"]
    paths = []
    for i in range(n):
        sub = root / ("sub" if i % 2 else "") / f"p{i:02d}{exts[i % len(exts)]}"
        paths.append(write_image(sub, i))
    (root / "notes.txt").write_text("not an image")
    return paths


def open_index(tmp_path: Path, backbone: Backbone, embedder_name: str, **kw) -> RegionIndex:
    return RegionIndex.create(
        tmp_path / "idx",
        model=backbone.name,
        embedder=embedder_name,
        dimension=backbone.embed_dim,
        **kw,
    )


def live_regions(index: RegionIndex) -> dict[str, list]:
    out: dict[str, list] = {}
    for rec in index.iter_images():
        out[rec.path] = index.regions_of_image(rec.id)
    return out


def assert_consistent(index: RegionIndex) -> None:
    """SQL live committed region ids == FAISS ids; nothing pending."""
    from sqlalchemy import select

    from regionsearch.store.models import Region

    with index.session() as s:
        rows = list(s.execute(select(Region.id, Region.vector_state, Region.deleted)))
    live = sorted(r.id for r in rows if not r.deleted)
    assert all(r.vector_state == "committed" for r in rows if not r.deleted)
    assert sorted(index.vectors.ids().tolist()) == live


def run(index, backbone, embedder, source=None, root=None, **kw):
    indexer = Indexer(index, backbone, embedder, source or StripeMasks(), progress=False, **kw)
    return indexer.run(root)


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
    assert "regions" in runner.invoke(cli_app, ["stats", *base]).output

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


# ----------------------------------------------------------------------------- crash safety

CHILD = textwrap.dedent(
    """
    import sys, typer
    from regionsearch.cli.index import register
    app = typer.Typer()
    register(app)
    sys.argv = ["regionsearch"] + sys.argv[1:]
    app()
    """
)


def _label_masks(root: Path, masks: Path, n: int) -> dict[str, int]:
    """n photos with a PNG label image each holding 1..5 instances; returns rel -> count."""
    expected = {}
    masks.mkdir(parents=True)
    for i in range(n):
        p = write_image(root / f"d{i % 3}" / f"img{i:03d}.png", 1000 + i, size=(40, 32))
        k = 1 + i % 5
        label = np.zeros((32, 40), np.uint8)
        for j in range(k):
            label[:, j * 8 : (j + 1) * 8] = j + 1
        Image.fromarray(label).save(masks / f"{p.stem}.png")
        expected[p.relative_to(root).as_posix()] = k
    return expected


def _db_regions(db: Path) -> int:
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)
        try:
            return con.execute("select count(*) from regions").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return 0


def _crash_scenario(
    tmp_path: Path,
    model_dir: Path,
    seed: int,
    kills: int,
    checkpoint_s: float,
    max_delay: float,
    *,
    extra_args: Sequence[str] = (),
    count_rows: Callable[[], int] | None = None,
    open_kwargs: dict[str, Any] | None = None,
) -> None:
    """SIGKILL the CLI indexing a folder, resume, check nothing is lost or doubled.

    ``extra_args`` go to ``regionsearch index`` (another database or vector location), with
    ``count_rows`` counting its region rows and ``open_kwargs`` reopening the index."""
    rng = random.Random(seed)
    root, masks = tmp_path / "photos", tmp_path / "masks"
    expected = _label_masks(root, masks, 30)
    total = sum(expected.values())
    idx_dir = tmp_path / "indexes"
    args = [
        sys.executable,
        "-c",
        CHILD,
        "index",
        str(root),
        "--index-dir",
        str(idx_dir),
        "--name",
        "crash",
        "--model",
        f"local-dir:{model_dir}",
        "-e",
        "masked-crop",
        "--masks",
        str(masks),
        "--batch-images",
        "2",
        "--workers",
        "1",
        "--checkpoint-seconds",
        str(checkpoint_s),
        "--no-progress",
        *extra_args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    db = idx_dir / "crash" / "regions.db"
    count = count_rows or (lambda: _db_regions(db))
    for attempt in range(kills):  # the CLI in a child process, SIGKILLed at a random point
        proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        start_rows = count()
        target = start_rows + rng.randint(1, max(2, (total - start_rows) // 2))
        deadline = time.monotonic() + 240
        while proc.poll() is None and time.monotonic() < deadline:
            if count() >= target:
                time.sleep(rng.random() * max_delay)  # land anywhere: W1, W2, C1, C2
                break
            time.sleep(0.02)
        if proc.poll() is not None:
            # A later run may finish the little work left before the random kill point comes;
            # that is a clean exit, not a crash, and leaves nothing more to kill.
            output = proc.communicate()[0].decode(errors="replace")[-2000:]
            assert proc.returncode == 0 and attempt > 0, output
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    # resume in-process through the Python API (same settings as the CLI run)
    backbone = Backbone.load(f"local-dir:{model_dir}", device="cpu")
    embedder = get_embedder("masked-crop", backbone)
    with RegionIndex.open(idx_dir / "crash", **(open_kwargs or {})) as index:
        repaired = index.last_reconcile
        durable = index.stats().images["indexed"]
        report = run(index, backbone, embedder, PngMaskSource(masks), root=root, batch_images=2)
        assert report.images_failed == 0 and not report.interrupted
        # durable work is kept, everything else is done once more
        assert report.images_indexed == len(expected) - durable
    assert repaired is not None
    print(f"seed {seed}: {durable} images durable at the kill; reconcile: {repaired}")
    with RegionIndex.open(idx_dir / "crash", **(open_kwargs or {})) as index:
        assert index.last_reconcile is not None and index.last_reconcile.clean
        assert_consistent(index)
        images = {rec.path: rec for rec in index.iter_images()}
        assert set(images) == set(expected)
        assert all(rec.status == "indexed" for rec in images.values())
        for rel, rec in images.items():
            regions = index.regions_of_image(rec.id)
            labels = sorted(int(r.external_id) for r in regions)
            assert labels == list(range(1, expected[rel] + 1)), rel  # none lost, none doubled
        assert index.stats().regions == total == index.vectors.ntotal
        assert index.model == backbone.name


def test_sigkill_anywhere_then_resume(tmp_path, model_dir):
    # checkpoints 1 s apart, kill right after rows appear: uncheckpointed batches must be dropped
    _crash_scenario(tmp_path, model_dir, seed=0, kills=1, checkpoint_s=1.0, max_delay=0.0)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_sigkill_anywhere_then_resume_more_seeds(tmp_path, model_dir, seed):
    checkpoint_s = (0.05, 1.0)[seed % 2]
    _crash_scenario(tmp_path, model_dir, seed, kills=2, checkpoint_s=checkpoint_s, max_delay=0.3)
