"""SAM 2 as a region source: mechanics with a tiny random-weight model (never quality).

The model is the package's own smallest config (``sam2.1_hiera_t``) shrunk to a width-8 Hiera
and a 32-wide decoder, with random weights saved as a checkpoint, so the whole path runs:
config -> model -> checkpoint load -> SAM2AutomaticMaskGenerator -> proposals. Thresholds are
0 because random weights rarely pass the default ones.
"""

from __future__ import annotations

import importlib.util
import json
import pickle
import sqlite3
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

from regionsearch.masks import RegionProposal, Sam2Proposals, rle
from regionsearch.masks.sam import _sam2_config_file, sam2_config_names
from regionsearch.masks.sources import as_rgb

needs_sam2 = pytest.mark.skipif(
    importlib.util.find_spec("sam2") is None,
    reason="sam2 is not installed (pip install 'regionsearch[sam2]')",
)

H, W = 48, 64
# Shrinks sam2.1_hiera_t to ~0.6 M parameters; input size stays 1024 (the predictor's).
TINY = {
    "model.image_encoder.trunk.embed_dim": 8,
    "model.image_encoder.trunk.stages": [1, 1, 1, 1],
    "model.image_encoder.trunk.global_att_blocks": [],  # windows only: ~1 s per photo on CPU
    "model.image_encoder.neck.d_model": 32,
    "model.image_encoder.neck.backbone_channel_list": [64, 32, 16, 8],
    "model.image_encoder.neck.position_encoding.num_pos_feats": 32,
    "model.memory_attention.d_model": 32,
    "model.memory_attention.num_layers": 1,
    "model.memory_attention.layer.d_model": 32,
    "model.memory_attention.layer.dim_feedforward": 32,
    "model.memory_attention.layer.self_attention.embedding_dim": 32,
    "model.memory_attention.layer.cross_attention.embedding_dim": 32,
    "model.memory_attention.layer.cross_attention.kv_in_dim": 16,
    "model.memory_encoder.out_dim": 16,
    "model.memory_encoder.in_dim": 32,
    "model.memory_encoder.position_encoding.num_pos_feats": 16,
    "model.memory_encoder.mask_downsampler.embed_dim": 32,
    "model.memory_encoder.fuser.layer.dim": 32,
    "model.memory_encoder.fuser.num_layers": 1,
}
LOOSE = {"points_per_side": 2, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}


@pytest.fixture(scope="module")
def tiny_sam2(tmp_path_factory) -> tuple[Path, Path]:
    """(config YAML, checkpoint) of a random-weight tiny SAM 2."""
    pytest.importorskip("sam2", reason="sam2 is not installed (pip install 'regionsearch[sam2]')")
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    folder = tmp_path_factory.mktemp("sam2")
    cfg = OmegaConf.load(_sam2_config_file("sam2.1_hiera_t", Path("unused.pt")))
    for key, value in TINY.items():
        OmegaConf.update(cfg, key, value, force_add=False)
    config = folder / "tiny.yaml"
    OmegaConf.save(cfg, config)
    torch.manual_seed(0)
    model = instantiate(cfg.model, _recursive_=True)
    checkpoint = folder / "tiny.pt"
    torch.save({"model": model.state_dict()}, checkpoint)
    return config, checkpoint


def photo() -> np.ndarray:
    rng = np.random.default_rng(0)
    image = np.full((H, W, 3), 90, np.uint8)
    image[10:30, 12:40] = (230, 40, 40)
    return np.clip(image + rng.integers(0, 20, (H, W, 1)), 0, 255).astype(np.uint8)


def reference(found: list[dict], max_regions: int) -> list[tuple[np.ndarray, float]]:
    """The contract spelled out slowly: non-empty masks, best clipped predicted IoU first."""
    kept = [m for m in found if m["segmentation"].any()]
    ranked = sorted(
        kept,
        key=lambda m: (-min(max(m["predicted_iou"], 0.0), 1.0), -m["stability_score"]),
    )
    return [(m["segmentation"], min(max(m["predicted_iou"], 0.0), 1.0)) for m in ranked][
        : max_regions - 1
    ]


@needs_sam2
def test_generator_end_to_end_keeps_the_contract(tiny_sam2) -> None:
    config, checkpoint = tiny_sam2
    proposer = Sam2Proposals(checkpoint, config, max_regions=6, box_nms_thresh=1.0, **LOOSE)
    image = photo()
    regions = proposer.masks_for(Path("photo.jpg"), image)

    assert regions[0].source == "full-image" and regions[0].mask.all() and regions[0].score == 1
    want = reference(proposer._generator.generate(as_rgb(image)), 6)
    assert len(want) >= 2, "thresholds 0 should leave several masks to order"
    assert len(regions) == 1 + len(want) <= 6
    for region, (mask, score) in zip(regions[1:], want, strict=True):
        assert isinstance(region, RegionProposal) and region.source == "sam2"
        assert region.mask.shape == (H, W) and region.mask.dtype == bool and region.mask.any()
        assert np.array_equal(region.mask, mask) and region.score == pytest.approx(score)
        assert 0.0 <= region.score <= 1.0
        encoded = region.to_rle()
        assert encoded["size"] == [H, W] and np.array_equal(rle.decode(encoded), region.mask)
        rows, cols = np.nonzero(region.mask)
        x, y = cols.min(), rows.min()
        assert rle.bbox(encoded) == pytest.approx([x, y, cols.max() - x + 1, rows.max() - y + 1])
    scores = [r.score for r in regions[1:]]
    assert scores == sorted(scores, reverse=True)

    # The reference ran the generator a second time: equal masks above mean a stable order.
    clone = pickle.loads(pickle.dumps(proposer))  # process workers get a rebuilt copy
    assert isinstance(clone, Sam2Proposals) and clone is not proposer
    assert clone._arguments == proposer._arguments and clone.max_regions == 6


@needs_sam2
def test_checkpoint_must_match_its_config(tiny_sam2, tmp_path: Path) -> None:
    config, checkpoint = tiny_sam2
    state = torch.load(checkpoint, weights_only=True)["model"]
    state.pop(next(iter(state)))
    partial = tmp_path / "partial.pt"
    torch.save({"model": state}, partial)
    with pytest.raises(ValueError, match=r"does not match the SAM 2 config tiny.yaml: 1 weights"):
        Sam2Proposals(partial, config, **LOOSE)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a PyTorch checkpoint"):
        Sam2Proposals(junk, config, **LOOSE)


@needs_sam2
def test_config_from_name_stem_or_checkpoint(tmp_path: Path) -> None:
    names = sam2_config_names()
    assert "configs/sam2.1/sam2.1_hiera_l.yaml" in names
    assert not any("training" in n for n in names)
    official = Path("sam2.1_hiera_large.pt")
    by_checkpoint = _sam2_config_file(None, official)
    assert by_checkpoint.as_posix().endswith("configs/sam2.1/sam2.1_hiera_l.yaml")
    assert by_checkpoint.is_file()
    assert (
        _sam2_config_file("sam2_hiera_s", official)
        .as_posix()
        .endswith("configs/sam2/sam2_hiera_s.yaml")
    )
    assert _sam2_config_file("configs/sam2.1/sam2.1_hiera_t.yaml", official).is_file()

    mine = tmp_path / "mine.pt"
    mine.write_bytes(b"")
    with pytest.raises(ValueError, match=r"cannot tell the SAM 2 config of mine.pt: pass one"):
        Sam2Proposals(mine)
    with pytest.raises(ValueError, match=r"unknown SAM 2 config 'hiera_xl'.*sam2.1_hiera_l"):
        Sam2Proposals(mine, "hiera_xl")


@needs_sam2
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"points_per_side": 0}, "points_per_side must be >= 1"),
        ({"points_per_batch": 0}, "points_per_batch must be >= 1"),
        ({"pred_iou_thresh": 1.5}, r"pred_iou_thresh must be in \[0, 1\]"),
        ({"stability_score_thresh": -0.1}, r"stability_score_thresh must be in \[0, 1\]"),
        ({"max_regions": 0}, "max_regions must be >= 1"),
    ],
)
def test_invalid_parameters(kwargs: dict, match: str, tmp_path: Path) -> None:
    checkpoint = tmp_path / "sam2.1_hiera_tiny.pt"
    checkpoint.write_bytes(b"")
    with pytest.raises(ValueError, match=match):
        Sam2Proposals(checkpoint, **kwargs)


@needs_sam2
def test_missing_checkpoint_says_where_to_get_one(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"SAM 2 checkpoint not found: .*absent.pt"):
        Sam2Proposals(tmp_path / "absent.pt")


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sam2", None)  # import now fails, installed or not
    with pytest.raises(ImportError, match=r"sam2 package: pip install 'regionsearch\[sam2\]'"):
        Sam2Proposals("sam2.1_hiera_large.pt")


def test_cli_refuses_two_mask_sources(tmp_path: Path) -> None:
    from regionsearch.cli.index import register

    app = typer.Typer()
    register(app)
    (tmp_path / "photos").mkdir()
    Image.fromarray(photo()).save(tmp_path / "photos" / "a.png")
    args = ["index", str(tmp_path / "photos"), "--index-dir", str(tmp_path / "ix"), "-n", "t"]
    both = ["--sam-checkpoint", "a.pth", "--sam2-checkpoint", "b.pt", "--no-progress"]
    result = CliRunner().invoke(app, [*args, *both])
    assert result.exit_code == 2
    assert "error: choose one mask source" in result.output and "--sam2-checkpoint" in result.output


@needs_sam2
def test_cli_indexes_sam2_regions(tiny_sam2, tmp_path: Path) -> None:
    """``regionsearch index --sam2-checkpoint``: the CLI options reach the generator."""
    from regionsearch.backbone.tiny import tiny_loaded_model, tiny_model_cfg
    from regionsearch.cli.index import register

    config, checkpoint = tiny_sam2
    model = tmp_path / "clip"
    model.mkdir()
    (model / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": tiny_model_cfg(), "preprocess_cfg": {"size": 32}})
    )
    torch.save(tiny_loaded_model(seed=0).model.state_dict(), model / "open_clip_pytorch_model.bin")
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(photo()).save(photos / "a.png")
    expected = Sam2Proposals(checkpoint, config, max_regions=4, **LOOSE).propose(photo())

    app = typer.Typer()
    register(app)
    args = [
        "index", str(photos), "--index-dir", str(tmp_path / "ix"), "-n", "t", "--no-progress",
        "--json", "--model", f"local-dir:{model}", "-e", "global", "--device", "cpu",
        "--workers", "0", "--max-regions", "4", "--sam2-checkpoint", str(checkpoint),
        "--sam2-config", str(config), "--sam2-points-per-side", "2",
        "--sam2-pred-iou-thresh", "0", "--sam2-stability-score-thresh", "0",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["regions_indexed"] == len(expected)
    with sqlite3.connect(tmp_path / "ix" / "t" / "regions.db") as db:
        sources = [s for (s,) in db.execute("SELECT source FROM regions ORDER BY id")]
    assert sources == [r.source for r in expected] and "sam2" in sources
