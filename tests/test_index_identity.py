"""An index remembers how its vectors were made: the embedder's full description (its options)
is recorded in the manifest, other options are refused, and the server embeds uploads with it.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import typer
from fastapi.testclient import TestClient
from indexer_helpers import make_photos, write_image
from PIL import Image
from test_search import tiny_backbone
from typer.testing import CliRunner

from regionsearch.api import Settings, create_app
from regionsearch.embedders import get_embedder
from regionsearch.indexer import Indexer
from regionsearch.masks import RegionProposal
from regionsearch.masks import rle as rle_mod
from regionsearch.store import RegionIndex
from regionsearch.store.manifest import EmbedderMismatchError, normalize_description


class TwoMasks:
    """The whole image and its left half: cheap and deterministic."""

    def masks_for(self, image_path, image):
        h, w = image.shape[:2]
        left = np.zeros((h, w), bool)
        left[:, : w // 2] = True
        return [RegionProposal(np.ones((h, w), bool), source="full-image"), RegionProposal(left)]


def build(tmp_path: Path, **options) -> tuple[RegionIndex, Path]:
    backbone = tiny_backbone()
    photos = tmp_path / "photos"
    make_photos(photos, 2)
    index = RegionIndex.create(
        tmp_path / "index", model=backbone.name, embedder="crop", dimension=backbone.embed_dim
    )
    embedder = get_embedder("crop", backbone, **options)
    Indexer(index, backbone, embedder, TwoMasks(), workers=0, progress=False).run(photos)
    return index, photos


def test_manifest_records_the_embedder_options(tmp_path: Path) -> None:
    index, _ = build(tmp_path, margin=0.3)
    with index:
        recorded = index.manifest.embedder_description
        described = get_embedder("crop", tiny_backbone(), margin=0.3).describe()
        assert recorded == normalize_description(described) and recorded["margin"] == 0.3
    copy = json.loads((tmp_path / "index" / "manifest.json").read_text())
    assert copy["extra"]["embedder_description"]["margin"] == 0.3
    with RegionIndex.open(tmp_path / "index", read_only=True) as again:  # from the database
        assert again.manifest.embedder_description == recorded


def test_other_options_are_refused_by_name(tmp_path: Path) -> None:
    index, photos = build(tmp_path, margin=0.3)
    backbone = tiny_backbone()
    with index:
        with pytest.raises(EmbedderMismatchError) as err:
            Indexer(index, backbone, get_embedder("crop", backbone), TwoMasks())
        message = str(err.value)
        assert "margin" in message and "0.3" in message and "0.1" in message
        assert "\n" not in message and "batch_size" not in message
        # batching changes speed, never the vectors: accepted
        same = get_embedder("crop", backbone, margin=0.3, batch_size=3)
        Indexer(index, backbone, same, TwoMasks(), workers=0, progress=False).run(photos)


def test_old_index_without_description_is_accepted_then_recorded(tmp_path: Path) -> None:
    backbone = tiny_backbone()
    with RegionIndex.create(
        tmp_path / "index", model=backbone.name, embedder="crop", dimension=backbone.embed_dim
    ) as old:
        assert old.manifest.embedder_description is None  # as made before this was recorded
    photos = tmp_path / "photos"
    make_photos(photos, 1)
    with RegionIndex.open(tmp_path / "index") as index:
        first = get_embedder("crop", backbone, margin=0.2)
        Indexer(index, backbone, first, TwoMasks(), workers=0, progress=False).run(photos)
        assert index.manifest.embedder_description["margin"] == 0.2
        with pytest.raises(EmbedderMismatchError, match="margin"):
            Indexer(index, backbone, get_embedder("crop", backbone), TwoMasks())


def crop_index_cli(tmp_path: Path, model_dir: Path) -> tuple[typer.Typer, list[str], Path]:
    """An app with ``index``, the arguments indexing two photos with crop into index ``t``,
    and the photo folder."""
    from regionsearch.cli.index import register

    app = typer.Typer()
    register(app)
    photos = tmp_path / "photos"
    make_photos(photos, 2)
    base = ["index", str(photos), "--index-dir", str(tmp_path / "ix"), "--name", "t"]
    base += ["--model", f"local-dir:{model_dir}", "-e", "crop", "--no-progress"]
    return app, base, photos


def test_cli_refuses_other_options_in_one_line(tmp_path: Path, model_dir: Path) -> None:
    app, base, photos = crop_index_cli(tmp_path, model_dir)
    runner = CliRunner()
    first = runner.invoke(app, [*base, "-E", "margin=0.25"])
    assert first.exit_code == 0, first.output
    write_image(photos / "new.png", 99)  # work to do (an up-to-date folder makes no vectors)
    again = runner.invoke(app, [*base, "-E", "margin=0.5"])
    assert again.exit_code == 1, again.output  # options that contradict the index: runtime
    err = again.stderr if hasattr(again, "stderr") else again.output
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "margin" in lines[0] and "0.25" in lines[0], lines


def test_cli_refuses_other_options_with_nothing_to_embed(tmp_path: Path, model_dir: Path) -> None:
    """An up-to-date folder builds no embedder, so the options are checked before the model
    loads: a contradicting -E fails, the recorded value or a speed-only one passes, and the
    index keeps what it was made with."""
    app, base, _ = crop_index_cli(tmp_path, model_dir)
    runner = CliRunner()
    assert runner.invoke(app, [*base, "-E", "margin=0.25"]).exit_code == 0
    refused = runner.invoke(app, [*base, "-E", "margin=0.5"])
    assert refused.exit_code == 1, refused.output
    assert "margin: index has 0.25, this run 0.5" in refused.stderr
    assert "loading model" not in refused.output
    for same in (["-E", "margin=0.25"], ["-E", "batch_size=3"], []):
        again = runner.invoke(app, [*base, *same])
        assert again.exit_code == 0, (same, again.output)
        assert "loading model" not in again.output  # nothing to embed: no model either
    with RegionIndex.open(tmp_path / "ix" / "t", read_only=True) as index:
        assert index.manifest.embedder_description["margin"] == 0.25


def test_cli_reindexes_with_the_model_and_embedder_the_index_was_built_with(
    tmp_path: Path, model_dir: Path
) -> None:
    """A later run without --model/-e/-E keeps the index's own settings, not the defaults."""
    from regionsearch.cli.index import register

    app = typer.Typer()
    register(app)
    photos = tmp_path / "photos"
    make_photos(photos, 2)
    base = [
        "index",
        str(photos),
        "--index-dir",
        str(tmp_path / "ix"),
        "--name",
        "t",
        "--no-progress",
    ]
    runner = CliRunner()
    built_with = ["--model", f"local-dir:{model_dir}", "-e", "crop", "-E", "margin=0.25"]
    first = runner.invoke(app, [*base, *built_with])
    assert first.exit_code == 0, first.output
    write_image(photos / "new.png", 99)
    again = runner.invoke(app, base)
    assert again.exit_code == 0, again.output
    with RegionIndex.open(tmp_path / "ix" / "t", read_only=True) as index:
        assert index.manifest.model == f"local-dir:{model_dir}"
        assert index.manifest.embedder == "crop" and index.manifest.n_images == 3
        assert index.manifest.embedder_description["margin"] == 0.25
    # Nothing changed, but another model: not "up to date" — the run refuses to mix models.
    other = runner.invoke(app, [*base, "--model", "reference"])
    assert other.exit_code == 1, other.output


def test_server_embeds_uploads_with_the_recorded_options(tmp_path: Path) -> None:
    index, _ = build(tmp_path, margin=0.5)
    index.close()
    backbone = tiny_backbone()
    rng = np.random.default_rng(4)
    pixels = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
    pixels[5:30, 8:40] = (250, 20, 20)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    app = create_app(Settings(index_dir=tmp_path / "index"), backbone=backbone)
    with TestClient(app) as client:
        res = client.post("/api/images", files={"file": ("u.png", buf.getvalue(), "image/png")})
        assert res.status_code == 201, res.text
        regions = res.json()["regions"]
    masks = np.stack([rle_mod.decode(r["rle"]) for r in regions]).astype(bool)
    with RegionIndex.open(tmp_path / "index", read_only=True) as served:
        stored = served.vectors.reconstruct(np.array([r["id"] for r in regions]))
    wanted = get_embedder("crop", backbone, margin=0.5).embed(pixels, masks).numpy()
    default = get_embedder("crop", backbone).embed(pixels, masks).numpy()
    assert not np.allclose(wanted, default, atol=1e-3), "the options must matter for this test"
    np.testing.assert_allclose(stored, wanted, atol=1e-5)


def test_server_follows_options_recorded_after_it_started(tmp_path: Path) -> None:
    # A server on an index from before descriptions were recorded; `index` records one while
    # the server runs: the next upload uses it (not the defaults the server would have guessed).
    backbone = tiny_backbone()
    directory = tmp_path / "index"
    RegionIndex.create(
        directory, model=backbone.name, embedder="crop", dimension=backbone.embed_dim
    ).close()
    photos = tmp_path / "photos"
    make_photos(photos, 1)
    pixels = np.random.default_rng(5).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    with TestClient(create_app(Settings(index_dir=directory), backbone=backbone)) as client:
        with RegionIndex.open(directory) as index:
            embedder = get_embedder("crop", backbone, margin=0.4)
            Indexer(index, backbone, embedder, TwoMasks(), workers=0, progress=False).run(photos)
        res = client.post("/api/images", files={"file": ("u.png", buf.getvalue(), "image/png")})
        assert res.status_code == 201, res.text
        regions = res.json()["regions"]
    masks = np.stack([rle_mod.decode(r["rle"]) for r in regions]).astype(bool)
    with RegionIndex.open(directory, read_only=True) as served:
        stored = served.vectors.reconstruct(np.array([r["id"] for r in regions]))
    wanted = get_embedder("crop", backbone, margin=0.4).embed(pixels, masks).numpy()
    np.testing.assert_allclose(stored, wanted, atol=1e-5)
