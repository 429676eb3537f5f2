"""The indexer's edges: high bit depths, huge photos, what the scan skips, exit codes, progress."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from regionsearch.cli.index import register
from regionsearch.image_io import ImageTooLargeError, configure_pillow, decode_bytes
from regionsearch.indexer import build_plan, decode_image
from regionsearch.indexer.report import PARTIAL_FAILURE_EXIT_CODE


def _png_bytes(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _jpeg(path: Path, size: tuple[int, int]) -> Path:
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)
    return path


@pytest.fixture
def cli_app() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


# ----------------------------------------------------------------------------- decoding


def test_sixteen_bit_grey_is_scaled_not_clipped():
    rng = np.random.default_rng(0)
    grey8 = rng.integers(0, 256, size=(24, 30), dtype=np.uint8)
    grey16 = grey8.astype(np.uint16) * 257  # the same picture at 16 bits
    assert Image.open(__import__("io").BytesIO(_png_bytes(grey16))).mode.startswith("I;16")
    decoded16 = decode_bytes(_png_bytes(grey16))
    decoded8 = decode_bytes(_png_bytes(grey8))
    np.testing.assert_array_equal(decoded16, decoded8)
    assert (decoded16 == 255).mean() < 0.05  # clipping made 75% of such pixels white


def test_huge_photo_is_refused_with_the_limit_in_words(tmp_path):
    path = _jpeg(tmp_path / "big.jpg", (400, 320))
    with pytest.raises(ImageTooLargeError, match=r"400x320 .*limit of 0\.1 MP.*--max-pixels"):
        decode_image(path, max_pixels=100_000)


def test_max_side_decodes_a_large_jpeg_at_reduced_scale(tmp_path):
    path = _jpeg(tmp_path / "big.jpg", (400, 320))
    decoded = decode_image(path, max_side=100, max_pixels=100_000)  # draft: 1/4 scale
    assert decoded.pixels.shape == (80, 100, 3)
    assert (decoded.width, decoded.height) == (400, 320)  # the photo's own size is kept
    # A PNG cannot be decoded at a reduced scale: the limit still applies to it.
    png = tmp_path / "big.png"
    Image.open(path).save(png)
    with pytest.raises(ImageTooLargeError):
        decode_image(png, max_side=100, max_pixels=100_000)


def test_limit_above_pillows_own_threshold(tmp_path, monkeypatch):
    path = _jpeg(tmp_path / "big.jpg", (400, 320))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # Pillow refuses at open (> 2x)
    with pytest.raises(ImageTooLargeError, match="--max-pixels"):
        decode_image(path)
    configure_pillow(500_000)  # what the CLI does with --max-pixels (monkeypatch restores it)
    assert decode_image(path, max_pixels=500_000).pixels.shape == (320, 400, 3)


# ----------------------------------------------------------------------------- the scan


def test_every_file_the_scan_sees_is_indexed_or_reported(tmp_path):
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    Image.fromarray(np.full((20, 24, 3), 200, np.uint8)).save(root / "anim.gif")
    _jpeg(root / "sub" / "a.jpg", (24, 20))
    (root / "notes.txt").write_text("hello")
    (root / "gone.jpg").symlink_to(root / "missing.jpg")
    (root / "loop.png").symlink_to(root / "loop.png")
    (root / "linked").symlink_to(root / "sub", target_is_directory=True)
    (root / ".cache").mkdir()
    plan = build_plan(root, None)
    assert sorted(i.entry.rel for i in plan.new) == ["anim.gif", "sub/a.jpg"]
    reasons = {f.rel: f.reason for f in plan.skipped}
    assert reasons.keys() == {"notes.txt", "gone.jpg", "loop.png", "linked", ".cache"}
    assert reasons["gone.jpg"].startswith("broken symbolic link")
    assert reasons["loop.png"] == "symbolic link loop"
    assert reasons["notes.txt"] == "not an image file: .txt"
    assert "not followed" in reasons["linked"] and "hidden" in reasons[".cache"]
    assert plan.to_json()["counts"]["skipped"] == 5
    assert "skipped" in plan.describe() and "gone.jpg" in plan.describe()
    assert decode_image(root / "anim.gif").pixels.shape == (20, 24, 3)


def test_names_that_are_not_utf8_are_reported_not_fatal(tmp_path):
    """Undecodable bytes in a file or folder name (a photo copied from an old camera or a
    Latin-1 disk) cannot go into SQL or JSON: such files are skipped and named printably
    (the whole run used to die with a UnicodeEncodeError), and the rest is indexed."""
    root = tmp_path / "photos"
    root.mkdir()
    _jpeg(root / "été ✓.jpg", (24, 20))
    _jpeg(Path(os.fsdecode(bytes(root) + b"/caf\xe9.jpg")), (24, 20))
    os.mkdir(bytes(root) + b"/d\xff")
    _jpeg(Path(os.fsdecode(bytes(root) + b"/d\xff/x.jpg")), (24, 20))
    plan = build_plan(root, None)
    assert [i.entry.rel for i in plan.new] == ["été ✓.jpg"]
    reasons = {f.rel: f.reason for f in plan.skipped}
    assert reasons == {
        "caf\ufffd.jpg": "file name is not valid UTF-8: rename it to index it",
        "d\ufffd": "folder name is not valid UTF-8: not entered (rename it to index it)",
    }
    assert json.loads(json.dumps(plan.to_json()))["counts"]["skipped"] == 2
    assert "caf\ufffd.jpg" in plan.describe()  # printable on any terminal


# ----------------------------------------------------------------------------- the command


def _index_args(tmp_path: Path, model_dir: Path) -> list[str]:
    return [
        "--index-dir",
        str(tmp_path / "indexes"),
        "--name",
        "t",
        "--model",
        f"local-dir:{model_dir}",
        "-e",
        "global",
        "--max-regions",
        "3",
    ]


def test_partial_failure_has_its_own_exit_code(tmp_path, model_dir, cli_app):
    root = tmp_path / "photos"
    root.mkdir()
    _jpeg(root / "good.jpg", (40, 32))
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(40))
    (root / "readme.md").write_text("x")
    args = ["index", str(root), *_index_args(tmp_path, model_dir), "--no-progress"]
    result = CliRunner().invoke(cli_app, [*args, "--json"])
    assert result.exit_code == PARTIAL_FAILURE_EXIT_CODE, result.output
    report = json.loads(result.stdout)
    assert report["images_indexed"] == 1 and report["images_failed"] == 1
    assert report["skipped"] == [{"path": "readme.md", "reason": "not an image file: .md"}]
    # A clean folder exits 0.
    (root / "broken.png").unlink()
    assert CliRunner().invoke(cli_app, args).exit_code == 0


def test_progress_from_the_first_second_and_no_model_for_nothing_to_do(
    tmp_path, model_dir, cli_app, monkeypatch
):
    root = tmp_path / "photos"
    root.mkdir()
    for i in range(3):  # fewer images than one store batch (8): the rate used to read 0.0
        _jpeg(root / f"p{i}.jpg", (40, 32))
    args = ["index", str(root), *_index_args(tmp_path, model_dir)]
    result = CliRunner().invoke(cli_app, args)
    assert result.exit_code == 0, result.output
    assert "scanning" in result.stderr and "loading model" in result.stderr
    rates = [float(r) for r in re.findall(r"([\d.]+) regions/s", result.stderr)]
    assert rates and rates[-1] > 0

    def no_model(*args, **kwargs):
        raise AssertionError("an unchanged folder must not load the model")

    monkeypatch.setattr("regionsearch.backbone.load_backbone", no_model)
    again = CliRunner().invoke(cli_app, [*args, "--json"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["plan"]["unchanged"] == 3


def test_stat_only_plan_reads_nothing(tmp_path, model_dir, cli_app):
    root = tmp_path / "photos"
    root.mkdir()
    _jpeg(root / "a.jpg", (40, 32))
    args = ["index", str(root), *_index_args(tmp_path, model_dir), "--no-progress"]
    assert CliRunner().invoke(cli_app, args).exit_code == 0
    os.utime(root / "a.jpg", (1, 1))  # stat changed, same bytes ("touched")
    from regionsearch.store import RegionIndex

    with RegionIndex.open(tmp_path / "indexes" / "t", read_only=True) as index:
        full = build_plan(root, index)
        quick = build_plan(root, index, hash_stat_changes=False)
    assert full.hashed == 1 and [i.entry.rel for i in full.touched] == ["a.jpg"]
    assert quick.hashed == 0 and [i.entry.rel for i in quick.changed] == ["a.jpg"]
    assert not quick.is_noop and not full.is_noop
