"""Depth growth of the reference tower: same function, new blocks learn, clear refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from regionsearch.eval.world.model_growth import block_layout, grow_state, tower_depth
from regionsearch.eval.world.reference_model import (
    build_model,
    load_init_weights,
    reference_model_cfg,
    trainable_state,
    write_fp16_weights,
)


def _model(layers: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = reference_model_cfg(
        image_size=32, patch_size=8, width=32, layers=layers, head_width=16, embed_dim=32
    )
    return build_model(cfg, load_text_weights=False).eval()


def _saved(tmp_path: Path, layers: int) -> tuple[torch.nn.Module, Path]:
    """A trained-looking model (random, then rounded to fp16 as saved) and its weights file."""
    model = _model(layers, seed=1)
    path = tmp_path / "old.safetensors"
    write_fp16_weights(trainable_state(model), path)
    model.load_state_dict({k: v.half().float() for k, v in model.state_dict().items()})
    return model, path


@pytest.mark.parametrize(
    ("old", "new", "layout"),
    [
        (4, 4, [0, 1, 2, 3]),
        (4, 7, [0, None, 1, None, 2, None, 3]),
        (4, 8, [0, None, None, 1, None, 2, None, 3]),
        (2, 5, [0, None, None, None, 1]),
        (1, 3, [None, None, 0]),
    ],
)
def test_new_blocks_fill_the_gaps_and_the_last_block_stays_old(old, new, layout):
    assert block_layout(old, new) == layout


def test_block_layout_refuses_to_shrink():
    with pytest.raises(ValueError, match="only grow"):
        block_layout(4, 3)


def test_grown_tower_computes_the_same_image_vectors(tmp_path):
    old, path = _saved(tmp_path, layers=2)
    grown = _model(layers=5, seed=2)
    messages: list[str] = []
    load_init_weights(grown, path, messages.append, grow=True)
    assert any("grown from 2 to 5 blocks (o+++o" in m for m in messages)
    assert tower_depth(grown.state_dict()) == 5
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        want = old.encode_image(pixels)
        got = grown.encode_image(pixels)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # Not the identity by accident: the old tower's own blocks do change the vectors.
    assert not torch.allclose(want, _model(layers=2, seed=3).encode_image(pixels), atol=1e-3)


def test_new_blocks_get_gradients_from_the_first_step(tmp_path):
    _, path = _saved(tmp_path, layers=2)
    grown = _model(layers=3, seed=2).train()
    load_init_weights(grown, path, lambda _: None, grow=True)
    grown.encode_image(torch.randn(2, 3, 32, 32)).square().sum().backward()
    new_block = grown.visual.transformer.resblocks[1]
    assert torch.count_nonzero(new_block.attn.out_proj.weight) == 0
    assert new_block.attn.out_proj.weight.grad.abs().sum() > 0
    assert new_block.mlp.c_proj.weight.grad.abs().sum() > 0


def test_grow_state_keeps_the_saved_non_block_parameters():
    saved = _model(layers=1, seed=1).state_dict()
    fresh = _model(layers=2, seed=2).state_dict()
    grown = grow_state(saved, fresh)
    assert grown.keys() == fresh.keys()
    assert torch.equal(grown["visual.proj"], saved["visual.proj"])
    assert torch.equal(
        grown["visual.transformer.resblocks.1.ln_1.weight"],
        saved["visual.transformer.resblocks.0.ln_1.weight"],
    )


def test_depth_mismatch_without_grow_names_the_fix(tmp_path):
    _, path = _saved(tmp_path, layers=2)
    with pytest.raises(ValueError, match=r"2 image-tower blocks, the model 3.*--grow"):
        load_init_weights(_model(layers=3, seed=2), path, lambda _: None)
    with pytest.raises(ValueError, match="2 image-tower blocks, the model 1"):
        load_init_weights(_model(layers=1, seed=2), path, lambda _: None, grow=True)


def test_grow_without_init_from_is_a_usage_error(tmp_path):
    from regionsearch.cli.app import app

    args = ["world", "train-reference", "--grow", "--layers", "6", "--out", str(tmp_path)]
    result = CliRunner().invoke(app, args, terminal_width=200)
    assert result.exit_code == 2
    assert "--grow" in result.output and "--init-from" in result.output
    assert not any(tmp_path.iterdir())  # nothing written
