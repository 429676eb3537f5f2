"""The command line as a whole: fast help, command order, readable help, shared options, codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from regionsearch.cli import app
from regionsearch.cli.errors import EXIT_USAGE, CliError
from regionsearch.cli.options import index_location, parse_key_values


def test_help_imports_no_heavy_module():
    code = (
        "import sys\n"
        "from regionsearch.cli import app\n"
        "try:\n    app(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'faiss', 'sqlalchemy', 'open_clip', 'skimage') "
        "if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "HEAVY []" in out.stdout, out.stdout + out.stderr


def test_commands_are_listed_in_order_of_use():
    help_text = CliRunner().invoke(app, ["--help"], terminal_width=80).output
    lines = help_text.split("Commands:")[1].splitlines()
    listed = [line.split()[0] for line in lines if line.startswith("  ") and line.strip()]
    first = ["index", "search", "refer", "serve"]
    assert listed[0] == "index" and [c for c in listed if c in first] == first
    assert max(listed.index(c) for c in first) < min(
        listed.index(c) for c in ("explain", "models", "eval", "world")
    )


@pytest.mark.parametrize("command", ["index", "search", "refer", "serve", "stats", "explain"])
def test_help_at_80_columns_shows_every_option_whole(command):
    result = CliRunner().invoke(app, [command, "--help"], terminal_width=80, env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert "…" not in result.output
    assert max(len(line) for line in result.output.splitlines()) <= 80
    click_command = typer.main.get_command(app).commands[command]
    for param in click_command.params:
        if isinstance(param, click.Option):
            for name in param.opts:
                assert name in result.output, (command, name)


def test_lazy_groups_forward_help_and_arguments():
    result = CliRunner().invoke(app, ["world", "--help"])
    assert result.exit_code == 0 and "generate" in result.output, result.output
    result = CliRunner().invoke(app, ["world", "no-such-command"])
    assert result.exit_code == EXIT_USAGE


def test_one_key_value_parser():
    parsed = parse_key_values(["steps=5", "lr=0.1", "fast=true", "name=vit-b", "alpha-x=2"], "-E")
    assert parsed == {"steps": 5, "lr": 0.1, "fast": True, "name": "vit-b", "alpha_x": 2}
    assert isinstance(parsed["steps"], int) and isinstance(parsed["fast"], bool)
    for bad in ("steps", "=3"):
        with pytest.raises(CliError, match="-E expects KEY=VALUE"):
            parse_key_values([bad], "-E")


def test_index_names_mean_the_same_everywhere(tmp_path, monkeypatch):
    monkeypatch.setenv("REGIONSEARCH_INDEX_DIR", str(tmp_path / "env"))
    assert index_location("photos") == tmp_path / "env" / "photos"
    assert index_location("photos", tmp_path / "x") == tmp_path / "x" / "photos"
    absolute = str(tmp_path / "somewhere" / "ix")
    assert index_location(absolute) == Path(absolute)  # index and search alike
    for bad in ("", "..", "."):
        with pytest.raises(CliError, match="invalid index name"):
            index_location(bad)


def test_usage_and_runtime_errors_have_their_own_codes(tmp_path):
    runner = CliRunner()
    missing = runner.invoke(app, ["stats", "--name", str(tmp_path / "none")])
    assert missing.exit_code == 1 and missing.stderr.startswith("error: "), missing.output
    assert "Traceback" not in missing.output
    bad_option = runner.invoke(app, ["stats", "--no-such-option"])
    assert bad_option.exit_code == 2
    bad_value = runner.invoke(app, ["index", str(tmp_path), "-E", "novalue", "--no-progress"])
    assert bad_value.exit_code == 2 and "KEY=VALUE" in bad_value.stderr, bad_value.output


def test_unknown_vector_location_fails_before_model_or_index(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    target = tmp_path / "ix"
    result = CliRunner().invoke(
        app,
        ["index", str(photos), "--name", str(target), "--vectors", "bogus://x", "--no-progress"],
    )
    assert result.exit_code == 1, result.output
    assert "bogus://" in result.stderr and "Traceback" not in result.output
    assert "loading model" not in result.output
    assert not target.exists()  # nothing half-created to trip the next run


def test_misspelt_embedder_option_fails_before_model_or_index(tmp_path):
    """Even a run with nothing to embed names the option the embedder does not take."""
    photos = tmp_path / "photos"
    photos.mkdir()
    target = tmp_path / "ix"
    args = ["index", str(photos), "--name", str(target), "--no-progress", "-E", "stepz=3"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "stepz" in result.stderr and "it takes steps, lr" in result.stderr
    assert "loading model" not in result.output and not target.exists()


@pytest.mark.parametrize(
    "option",
    [
        ["--batch-images", "0"],
        ["--max-pixels", "0"],
        ["--workers", "-1"],
        ["--max-side", "3"],
        ["--max-regions", "0"],
        ["--checkpoint-seconds", "-1"],
    ],
)
def test_out_of_range_index_options_are_usage_errors(tmp_path, option):
    """Bounds a run cannot work without are checked by the parser: no traceback
    (--batch-images 0) and no run where every photo fails (--max-pixels 0)."""
    photos = tmp_path / "photos"
    photos.mkdir()
    target = tmp_path / "ix"
    result = CliRunner().invoke(app, ["index", str(photos), "--name", str(target), *option])
    assert result.exit_code == 2 and option[0] in result.output, result.output
    assert not target.exists()


def test_a_folder_without_photos_says_so(tmp_path, model_dir):
    """An empty run is not an error, but a folder with no image files gets a note naming the
    extensions looked for; a folder with photos does not."""
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    (photos / "sub" / "notes.txt").write_text("not a photo")
    args = ["index", str(photos), "--name", str(tmp_path / "ix"), "--no-progress"]
    args += ["--model", f"local-dir:{model_dir}", "-e", "crop"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "note: no photos found under" in result.stderr and ".jpg" in result.stderr
    Image.new("RGB", (32, 24), (200, 30, 30)).save(photos / "sub" / "red.png")
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert "no photos found" not in again.stderr


def test_lost_vectors_are_embedded_again_though_no_photo_changed(tmp_path, model_dir):
    """The SQL rows say 'indexed' but the vector folder is gone (deleted, a partial restore):
    the next run must not report 'unchanged' and leave every search empty; it re-embeds."""
    import shutil

    from regionsearch.store import RegionIndex

    photos = tmp_path / "photos"
    photos.mkdir()
    for i, colour in enumerate([(200, 30, 30), (30, 30, 200)]):
        Image.new("RGB", (32, 24), colour).save(photos / f"p{i}.png")
    args = ["index", str(photos), "--name", str(tmp_path / "ix"), "--no-progress", "--json"]
    args += ["--model", f"local-dir:{model_dir}", "-e", "crop"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    shutil.rmtree(tmp_path / "ix" / "vectors.segments")
    search = ["search", "red", "--name", str(tmp_path / "ix"), "--model", f"local-dir:{model_dir}"]
    warned = CliRunner().invoke(app, search)
    assert warned.exit_code == 0 and "but 0 vectors" in warned.stderr, warned.output
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["images_indexed"] == 2
    with RegionIndex.open(tmp_path / "ix", read_only=True) as index:
        stats = index.stats()
    assert stats.regions == stats.vectors == json.loads(first.stdout)["regions_indexed"]


def test_console_script_entry_point_is_the_package():
    env = dict(os.environ, COLUMNS="80")
    out = subprocess.run(
        [sys.executable, "-m", "regionsearch.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert out.returncode == 0 and "index" in out.stdout and "Exit status" in out.stdout


def test_proposal_ranking_reaches_the_automatic_proposer_only(tmp_path):
    from regionsearch.cli.index import _mask_source

    def source(**kwargs):
        return _mask_source(None, None, None, "vit_b", 50, None, **kwargs)

    assert source(proposal_ranking="coco+world").objectness == "coco+world"
    assert source().objectness == "coco"  # the proposer's own default
    with pytest.raises(CliError, match="unknown objectness fit 'nope'"):
        source(proposal_ranking="nope")
    coco = tmp_path / "instances.json"
    with pytest.raises(CliError, match="automatic proposals only"):
        _mask_source(coco, None, None, "vit_b", 50, None, proposal_ranking="coco")


def test_models_lists_the_bundled_models_and_marks_the_default():
    from regionsearch import DEFAULT_MODEL
    from regionsearch.backbone import list_bundled_models

    out = CliRunner().invoke(app, ["models"]).output
    assert f"{DEFAULT_MODEL} (default)" in out
    assert all(name in out for name in list_bundled_models())
    assert out.count("(default)") == 1
    assert "reference-v8 runs maskinversion with steps=5, lr=0.4" in out
