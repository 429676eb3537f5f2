"""Training at scale: the parallel shard renderer, the GPU-resident batches and a run that does
without the MiniLM weights (what a GPU machine without the text package needs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from regionsearch.eval.world.batches import (
    TrainingBatches,
    _RenderJob,
    build_caption_pool,
    render_training_shard,
)
from regionsearch.eval.world.reference_model import WORLD_MEAN, WORLD_STD


def _render(out: Path, workers: int, chunk: int = 4, n: int = 10, masks: bool = True) -> dict:
    pool = build_caption_pool(3, 6)
    path = render_training_shard(
        out,
        pool,
        n,
        11,
        24,
        with_masks=masks,
        progress=False,
        world="v2dr",
        workers=workers,
        chunk=chunk,
    )
    return dict(np.load(path))


def test_parallel_render_depends_on_the_chunks_not_the_worker_count(tmp_path):
    two = _render(tmp_path / "two", workers=2)
    three = _render(tmp_path / "three", workers=3)
    assert two.keys() == three.keys() == {"images", "entry", "classes", "areas", "masks"}
    for key in two:
        assert np.array_equal(two[key], three[key]), key
    # Chunk k is the stream seeded [seed, k]: the second chunk (scenes 4..7) rendered alone.
    pool = build_caption_pool(3, 6)
    job = _RenderJob(pool, 24, (0.15, 0.75), (0.15, 0.45), "train-dr", True)
    alone = job.render(4, 8, np.random.default_rng([11, 1]))
    assert np.array_equal(alone["images"], two["images"][4:8])
    assert np.array_equal(alone["masks"], two["masks"][4:8])
    # Groups follow the global scene index (1, 2-3, 4-6 objects in turn), across chunks too.
    counts = (two["classes"] >= 0).sum(axis=1)
    assert list(counts[[0, 3, 6, 9]]) == [1, 1, 1, 1]
    assert all(2 <= c <= 3 for c in counts[[1, 4, 7]])
    assert all(c >= 4 for c in counts[[2, 5, 8]])
    # Every object's mask is drawn; a sequential render is another (valid) shard.
    assert (two["masks"].reshape(10, 6, -1).any(axis=-1) == (two["classes"] >= 0)).all()
    sequential = _render(tmp_path / "one", workers=1)
    assert not np.array_equal(sequential["images"], two["images"])


def test_unpacked_masks_give_the_same_batches_as_packed_ones(tmp_path):
    _render(tmp_path / "shard", workers=1, n=9)
    pool = build_caption_pool(3, 6)
    shard = tmp_path / "shard" / "shard.npz"
    packed = TrainingBatches(shard, pool, WORLD_MEAN, WORLD_STD, transpose=True)
    unpacked = TrainingBatches(
        shard, pool, WORLD_MEAN, WORLD_STD, transpose=True, unpack_masks=True
    )
    assert packed.masks is None and unpacked.masks is not None
    idx = np.array([0, 4, 4, 8, 2])
    x_a, labels_a = packed.views_for(idx, np.random.default_rng(5), patch=4)
    x_b, labels_b = unpacked.views_for(idx, np.random.default_rng(5), patch=4)
    assert torch.equal(x_a, x_b) and torch.equal(labels_a, labels_b)
    assert (labels_a >= 0).any()  # objects are labelled, so the comparison means something
    assert torch.equal(packed.class_targets(idx, 64), unpacked.class_targets(idx, 64))


def _train_args(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "world", "train-reference", "--out", str(tmp_path / "out"), "--steps", "2",
        "--minutes", "0", "--batch-size", "4", "--n-scenes", "6", "--n-captions", "4",
        "--image-size", "32", "--width", "32", "--layers", "1", "--heads", "2",
        "--world", "v2", "--cache-dir", str(tmp_path / "cache"), "--threads", "1",
        "--n-final", "0", "--checkpoint-every", "1", *extra,
    ]  # fmt: skip


def test_training_without_text_weights_needs_cached_caption_features(tmp_path):
    from regionsearch.cli.app import app

    runner = CliRunner()
    refused = runner.invoke(app, _train_args(tmp_path, "--no-text-weights"))
    assert refused.exit_code == 2
    assert "caption features cached" in _plain(refused.output) and "Traceback" not in refused.output
    first = runner.invoke(app, _train_args(tmp_path))  # encodes and caches the captions
    assert first.exit_code == 0, first.output
    assert list((tmp_path / "cache").glob("text-feats-*.npy"))
    (tmp_path / "cache" / "resume.pt").unlink()
    second = runner.invoke(app, _train_args(tmp_path, "--no-text-weights"))
    assert second.exit_code == 0, second.output
    assert "MiniLM built without its weights" in second.output
    assert (tmp_path / "out" / "reference.safetensors").is_file()
    args = _train_args(tmp_path, "--no-text-weights")
    args[args.index("--n-final") + 1] = "5"
    final = runner.invoke(app, args)
    assert final.exit_code == 2 and "final evaluation off" in _plain(final.output)


def _plain(output: str) -> str:
    """CLI output with the error box's borders and line breaks taken out."""
    return " ".join(output.replace("│", " ").split())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_batches_match_cpu_batches(tmp_path):
    _render(tmp_path / "shard", workers=1, n=9)
    pool = build_caption_pool(3, 6)
    shard = tmp_path / "shard" / "shard.npz"
    cpu = TrainingBatches(shard, pool, WORLD_MEAN, WORLD_STD, transpose=True)
    gpu = TrainingBatches(shard, pool, WORLD_MEAN, WORLD_STD, transpose=True, device="cuda")
    idx = np.array([1, 3, 8, 8])
    x_a, labels_a = cpu.views_for(idx, np.random.default_rng(2), patch=8)
    x_b, labels_b = gpu.views_for(idx, np.random.default_rng(2), patch=8)
    assert torch.allclose(x_a, x_b.cpu()) and torch.equal(labels_a, labels_b.cpu())


def _tiny_base_model(tmp_path: Path) -> Path:
    """A tiny reference model saved as ``tmp_path/models/tiny`` (once); its folder."""
    from regionsearch.eval.world.reference_model import (
        build_model,
        reference_model_cfg,
        save_reference,
    )

    models = tmp_path / "models"
    if not (models / "tiny.json").is_file():
        cfg = reference_model_cfg(
            image_size=32, patch_size=8, width=32, layers=1, head_width=16, embed_dim=32
        )
        torch.manual_seed(0)
        model = build_model(cfg, load_text_weights=False)  # only trained parts are saved
        save_reference(model, models, cfg, {"steps": 0}, WORLD_MEAN, WORLD_STD, "tiny")
    return models


def _tiny_alphaclip_run(tmp_path: Path, device: str, text_features: str | None = None) -> dict:
    """Three fine-tune steps of the tiny base model's Alpha-CLIP variant."""
    from regionsearch.eval.world.train_alphaclip import AlphaConfig, train_alphaclip

    models = _tiny_base_model(tmp_path)
    alpha = AlphaConfig(
        steps=3,
        minutes=None,
        batch_size=4,
        n_scenes=9,
        n_eval_scenes=2,
        warmup_steps=1,
        cache_dir=str(tmp_path / "cache"),
        world="v2",
        name="tiny",
        negative_frac=0.5,
        device=device,
        text_features=text_features,
    )
    torch.set_num_threads(1)
    return train_alphaclip(alpha, models, log=lambda s: None)


def test_alphaclip_fine_tune_records_its_device_and_writes_host_weights(tmp_path):
    from safetensors.torch import load_file

    record = _tiny_alphaclip_run(tmp_path, "cpu")
    assert record["device"] == "cpu" and record["steps"] == 3
    weights = load_file(str(tmp_path / "models" / "tiny-alphaclip.safetensors"))
    assert weights["visual.conv1_alpha.weight"].abs().sum() > 0  # the alpha conv moved off zero
    assert all(v.device.type == "cpu" and v.dtype == torch.float16 for v in weights.values())


def test_alphaclip_fine_tune_without_text_weights_uses_the_saved_class_prompts(tmp_path):
    from safetensors.torch import load_file

    from regionsearch.eval.world.reference_model import make_tokenizer
    from regionsearch.eval.world.train_alphaclip import (
        load_class_text,
        load_reference,
        save_class_text,
    )

    weights = tmp_path / "models" / "tiny-alphaclip.safetensors"
    full = _tiny_alphaclip_run(tmp_path, "cpu")
    with_tower = load_file(str(weights))
    model, config = load_reference(tmp_path / "models", "tiny")
    saved = save_class_text(model, make_tokenizer(config["model_cfg"]), tmp_path / "text.npz")
    light = _tiny_alphaclip_run(tmp_path, "cpu", text_features=str(saved))
    assert light["text_features"] == str(saved)
    assert light["region_top1_before"] == full["region_top1_before"]
    for key, value in load_file(str(weights)).items():
        torch.testing.assert_close(value.float(), with_tower[key].float(), atol=2e-3, rtol=0)
    with torch.no_grad():
        model.text.proj[0].weight.add_(0.01)  # another text side: its prompts are refused
    with pytest.raises(ValueError, match="another text side"):
        load_class_text(saved, model)
    np.savez(tmp_path / "other.npz", vectors=np.zeros((64, 32)))
    with pytest.raises(ValueError, match="not a class-prompt file"):
        load_class_text(tmp_path / "other.npz", model)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message where no GPU is seen")
@pytest.mark.parametrize("command", ["train-reference", "train-alphaclip"])
def test_cuda_device_without_a_gpu_is_a_usage_error(tmp_path, command):
    from regionsearch.cli.app import app

    target = (
        ["--out", str(tmp_path)] if command == "train-reference" else ["--models", str(tmp_path)]
    )
    result = CliRunner().invoke(
        app, ["world", command, "--device", "cuda", *target], terminal_width=200
    )
    assert result.exit_code == 2 and "no CUDA device" in result.output
    assert not any(tmp_path.iterdir())


def test_missing_text_features_file_is_a_usage_error(tmp_path):
    from regionsearch.cli.app import app

    args = ["world", "train-alphaclip", "--models", str(tmp_path)]
    result = CliRunner().invoke(
        app, [*args, "--text-features", str(tmp_path / "none.npz")], terminal_width=200
    )
    assert result.exit_code == 2 and "no such file" in result.output
    assert not any(tmp_path.iterdir())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_alphaclip_fine_tune_on_the_gpu_starts_where_the_cpu_one_does(tmp_path):
    """Runs where MiniLM's weights may be missing (a lent GPU machine): stand-in class prompts
    carry the model's own text fingerprint."""
    from regionsearch.eval.world.train_alphaclip import load_reference, text_side_fingerprint

    model, _ = load_reference(_tiny_base_model(tmp_path), "tiny", load_text_weights=False)
    prompts = torch.nn.functional.normalize(
        torch.randn(64, 32, generator=torch.Generator()), dim=-1
    )
    np.savez(
        tmp_path / "text.npz",
        features=prompts.numpy(),
        fingerprint=np.array(text_side_fingerprint(model)),
    )
    cpu = _tiny_alphaclip_run(tmp_path, "cpu", text_features=str(tmp_path / "text.npz"))
    gpu = _tiny_alphaclip_run(tmp_path, "cuda", text_features=str(tmp_path / "text.npz"))
    assert gpu["device"] == torch.cuda.get_device_name(0)
    # conv1_alpha starts at zero, so "before" is the base model itself on either device.
    assert gpu["region_top1_before"] == cpu["region_top1_before"]
    assert gpu["region_top1"]["n_regions"] == cpu["region_top1"]["n_regions"]
