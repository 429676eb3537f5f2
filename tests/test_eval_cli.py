"""`regionsearch eval` on the command line: what it writes, and its one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
import typer
from typer.testing import CliRunner

from regionsearch.eval.runner import POINTING_LABEL, ROW_KEYS, TIMING_KEYS


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread, as in test_eval.py (the tiny models gain nothing from more)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cli_app():
    from regionsearch.eval.cli import eval_command

    app = typer.Typer()
    app.command()(eval_command)
    return app


def _local_dir_model(tmp_path):
    from regionsearch.backbone.tiny import tiny_loaded_model, tiny_model_cfg

    folder = tmp_path / "tiny"
    folder.mkdir()
    config = {"model_cfg": tiny_model_cfg(), "preprocess_cfg": {"size": 32}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    torch.save(tiny_loaded_model(seed=0).model.state_dict(), folder / "open_clip_pytorch_model.bin")
    return f"local-dir:{folder}"


def test_cli_writes_table_json_chart_and_markdown(world_dir, tmp_path):
    out = tmp_path / "out"
    args = [
        "--world", str(world_dir), "--model", _local_dir_model(tmp_path), "--device", "cpu",
        "--embedders", "global,masked-crop,maskinversion", "--steps", "1",
        "--expression-alpha", "5", "--variant", "maskinversion:lr=0.1,steps=2",
        "--limit", "2", "--no-progress",
        "--json", str(out / "r.json"), "--chart", str(out / "r.png"),
        "--markdown", str(out / "r.md"),
    ]  # fmt: skip
    result = CliRunner().invoke(_cli_app(), args)
    assert result.exit_code == 0, result.output
    assert "| masked-crop |" in result.output
    rows = json.loads((out / "r.json").read_text())
    assert {r["embedder"] for r in rows} == {
        "global",
        "masked-crop",
        "maskinversion",
        "maskinversion (lr=0.1, steps=2)",
        "maskinversion (alpha=5)",
        POINTING_LABEL,  # the pointing game runs by default, once per model
    }

    def tasks(embedder: str) -> set[str]:
        return {r["task"] for r in rows if r["embedder"] == embedder} - {"classes (same colour)"}

    every_task = {"classes", "retrieval", "expressions", "grounding"}
    assert tasks("maskinversion (lr=0.1, steps=2)") == tasks("maskinversion") == every_task
    assert "pointing" in tasks(POINTING_LABEL)
    assert all(set(ROW_KEYS) <= set(r) <= set(ROW_KEYS) | set(TIMING_KEYS) for r in rows)
    assert (out / "r.png").stat().st_size > 1000
    report = (out / "r.md").read_text()
    assert "steps=1" in report and "alpha=5.0" in report and "2 images" in report


def test_cli_runs_maskinversion_with_the_models_own_settings(world_dir, tmp_path):
    """Without --steps / --lr, MaskInversion runs with what the model's config records; a flag
    given overrides only itself."""
    import shutil

    from regionsearch.backbone.loading import bundled_models_dir

    shutil.copy(bundled_models_dir() / "reference.safetensors", tmp_path / "mine.safetensors")
    config = json.loads((bundled_models_dir() / "reference.json").read_text())
    config["embedder_defaults"] = {"maskinversion": {"steps": 1, "lr": 0.3}}
    (tmp_path / "mine.json").write_text(json.dumps(config))
    base = [
        "--world", str(world_dir), "--model", str(tmp_path / "mine.safetensors"),
        "--device", "cpu", "--embedders", "maskinversion", "--tasks", "classes",
        "--limit", "1", "--no-progress", "--markdown", str(tmp_path / "r.md"),
    ]  # fmt: skip
    for extra, expected in (([], "steps=1, lr=0.3"), (["--steps", "2"], "steps=2, lr=0.3")):
        result = CliRunner().invoke(_cli_app(), base + extra)
        assert result.exit_code == 0, result.output
        assert f"maskinversion: {expected}," in (tmp_path / "r.md").read_text()


def test_cli_errors_are_one_line(world_dir, tmp_path):
    runner = CliRunner()
    app = _cli_app()
    result = runner.invoke(app, ["--world", str(world_dir), "--embedders", "crop,nope"])
    assert result.exit_code == 2 and "unknown embedder(s) nope" in result.output
    result = runner.invoke(
        app, ["--images", str(tmp_path), "--annotations", str(tmp_path / "missing.json")]
    )
    assert result.exit_code == 2 and "annotations file not found" in result.output
    result = runner.invoke(app, ["--world", str(world_dir), "--world-generate", "3"])
    assert result.exit_code == 2 and "choose one data source" in result.output
    result = runner.invoke(app, ["--world-generate", "3", "--seed", "1234"])
    assert result.exit_code == 2 and "trained" in result.output
    result = runner.invoke(app, ["--world", str(world_dir), "--tasks", "classes,serach"])
    assert result.exit_code == 2 and "unknown task(s) ['serach']" in result.output
    assert "pointing, search" in result.output
    result = runner.invoke(app, ["--world", str(world_dir), "--proposal-ranking", "nope"])
    assert result.exit_code == 2 and "--proposal-ranking): unknown objectness fit" in result.output
    result = runner.invoke(app, ["--world", str(world_dir), "--max-regions", "0"])
    assert result.exit_code == 2 and "max_regions must be >= 1" in result.output
    args = ["--world", str(world_dir), "--embedders", "crop,maskinversion", "--lr", "0"]
    result = runner.invoke(app, [*args, "--tasks", "classes", "--limit", "1", "--no-progress"])
    assert result.exit_code == 2 and "embedder 'maskinversion': lr must be > 0" in result.output
    for bad, message in [
        ("maskinversion", "expected EMBEDDER:KEY=VALUE"),
        ("maskinversion:lr", "expected EMBEDDER:KEY=VALUE"),
        ("alphaclip:batch_size=2", "not among the evaluated embedders"),
    ]:
        args = ["--world", str(world_dir), "--embedders", "crop", "--variant", bad]
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and message in result.output, (bad, result.output)


def test_cli_world_family_needs_a_generated_split(world_dir):
    args = ["--world", str(world_dir), "--world-family", "heldout", "--no-progress"]
    result = CliRunner().invoke(_cli_app(), args)
    assert result.exit_code == 2 and "--world-family applies to --world-generate" in result.output
