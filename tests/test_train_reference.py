"""Training code of the reference CLIP, and a regression guard on the shipped weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from regionsearch.eval.world.batches import build_caption_pool, curriculum_weights, hard_negative
from regionsearch.eval.world.reference_model import (
    WORLD_MEAN,
    WORLD_STD,
    build_model,
    reference_model_cfg,
)
from regionsearch.eval.world.scene import render_scene
from regionsearch.eval.world.train_losses import training_loss
from regionsearch.eval.world.train_reference import _param_groups
from regionsearch.eval.world.vocab import class_index

MODELS = Path(__file__).resolve().parents[1] / "regionsearch" / "models"


def test_loss_is_finite_and_overfits_a_fixed_batch():
    torch.manual_seed(0)
    cfg = reference_model_cfg(
        image_size=32, patch_size=8, width=32, layers=1, head_width=16, embed_dim=32
    )
    model = build_model(
        cfg, load_text_weights=False
    )  # random MiniLM: only the cached features matter
    model.text.transformer.requires_grad_(False)
    rng = np.random.default_rng(0)
    scenes = [render_scene(rng, 32, n_objects=1 + i % 2, size_range=(0.3, 0.5)) for i in range(8)]
    mean = torch.tensor(WORLD_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(WORLD_STD).view(1, 3, 1, 1)
    images = (
        torch.from_numpy(np.stack([s.image for s in scenes])).permute(0, 3, 1, 2) / 255.0 - mean
    ) / std
    labels = [[class_index(o.colour, o.shape) for o in s.objects] for s in scenes]
    entry = torch.arange(8)
    pos = torch.randn(8, 384)
    neg = torch.randn(4, 384)
    bank = torch.randn(64, 384)
    target = torch.zeros(8, 64)
    for i, ids in enumerate(labels):
        target[i, ids] = 1.0 / len(ids)
    opt = torch.optim.AdamW(_param_groups(model, 0.0), lr=3e-3)
    losses = []
    for _ in range(3):
        loss, parts = training_loss(model, images, pos, neg, bank, entry, target)
        assert torch.isfinite(loss) and all(np.isfinite(v) for v in parts.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    assert model.text.transformer.embeddings.word_embeddings.weight.grad is None


def test_caption_pool_and_curriculum():
    pool = build_caption_pool(0, 40)
    assert len(pool.entries) == 64 + 40
    assert pool.texts[pool.bank_text[0]] == "a photo of a red circle."
    for e, ids in enumerate(pool.entries[64:], start=64):
        assert len(set(ids)) == len(ids) >= 2
        assert pool.texts[pool.pos_text[e][0]] != pool.texts[pool.neg_text[e]]
    neg = hard_negative([0, 9, 20], np.random.default_rng(1))
    assert sum(a != b for a, b in zip(neg, [0, 9, 20], strict=True)) == 1
    assert not set(neg) - {0, 9, 20} <= {0, 9, 20}
    early, late = curriculum_weights(0.0), curriculum_weights(1.0)
    assert early[0] > late[0] and early[2] < late[2]


@pytest.mark.slow
def test_shipped_reference_weights_zero_shot():
    if (
        not (MODELS / "reference.json").is_file()
        or not (MODELS / "reference.safetensors").is_file()
    ):
        pytest.skip("reference weights are not shipped in this checkout")
    from regionsearch.eval.world.reference_model import make_tokenizer
    from regionsearch.eval.world.train_alphaclip import load_reference
    from regionsearch.eval.world.zero_shot import class_text_features, make_eval_set, zero_shot

    torch.set_num_threads(2)
    model, config = load_reference(MODELS)
    prep = config["preprocess_cfg"]
    assert (MODELS / "reference.safetensors").stat().st_size <= 25 * 2**20
    text = class_text_features(model, make_tokenizer(config["model_cfg"]))
    data = make_eval_set(2024, 64, (1, 1), prep["size"], tuple(prep["mean"]), tuple(prep["std"]))
    acc = zero_shot(model, text, data)
    assert acc["top1_dominant"] >= 0.8, acc
    assert json.loads((MODELS / "reference.json").read_text())["training"]["steps"] > 0


def test_alpha_input_starts_as_the_base_model():
    from regionsearch.eval.world.train_alphaclip import AlphaInput

    torch.manual_seed(0)
    cfg = reference_model_cfg(
        image_size=32, patch_size=8, width=32, layers=1, head_width=16, embed_dim=32
    )
    model = build_model(cfg, load_text_weights=False).eval()
    alpha_in = AlphaInput(model.visual)
    assert "visual.conv1_alpha.weight" in model.state_dict()
    assert model.visual.conv1_alpha.weight.shape == (32, 1, 8, 8)
    pixels = torch.randn(2, 3, 32, 32)
    alpha = (torch.rand(2, 1, 32, 32) > 0.5).float()
    with torch.no_grad():
        plain = model.encode_image(pixels)
        assert torch.allclose(alpha_in.encode(model, pixels, alpha), plain, atol=1e-6)
        model.visual.conv1_alpha.weight.normal_()
        assert not torch.allclose(alpha_in.encode(model, pixels, alpha), plain, atol=1e-4)
        assert torch.allclose(
            model.encode_image(pixels), plain, atol=1e-6
        )  # no alpha set: unchanged


def test_v2_caption_pool_shares_colours_and_negatives_change_shapes():
    from regionsearch.eval.world.vocab import SHAPES

    pool = build_caption_pool(0, 200, same_colour_share=1.0, shape_negative_share=1.0)
    n_shapes = len(SHAPES)
    for ids in pool.entries[64:]:
        colours = [c // n_shapes for c in ids]
        assert len(set(ids)) == len(ids) and len(set(colours)) < len(colours)
    rng = np.random.default_rng(3)
    for _ in range(50):
        ids = [0, 1, 2]  # red circle, red square, red triangle
        neg = hard_negative(ids, rng, shape_share=1.0)
        changed = [(a, b) for a, b in zip(ids, neg, strict=True) if a != b]
        assert len(changed) == 1
        old, new = changed[0]
        assert old // n_shapes == new // n_shapes and new not in ids  # same colour, new shape
    plain = build_caption_pool(0, 200)
    shared = sum(len({c // n_shapes for c in ids}) < len(ids) for ids in plain.entries[64:])
    assert shared < 0.5 * 200  # the v1 pool draws classes independently


def _tiny_v2_config(tmp_path, steps, checkpoint):
    from regionsearch.eval.world.train_reference import TrainConfig

    return TrainConfig(
        steps=steps,
        minutes=None,
        batch_size=4,
        n_scenes=9,
        n_multi_captions=4,
        eval_every=1000,
        checkpoint_every=2,
        n_eval=2,
        model=reference_model_cfg(
            image_size=32, patch_size=8, width=32, layers=1, head_width=16, embed_dim=32
        ),
        cache_dir=str(tmp_path / "cache"),  # shared: captions are encoded once
        checkpoint=str(tmp_path / checkpoint),
        world="v2",
        same_colour_share=0.5,
        log_every=1,
        final_eval=False,
        warmup_steps=1,
    )


def test_training_resumes_exactly_after_being_killed(tmp_path):
    from regionsearch.eval.world.train_reference import train_reference

    torch.set_num_threads(1)
    straight = tmp_path / "straight"
    train_reference(_tiny_v2_config(tmp_path, 6, "a.pt"), straight / "out", log=lambda s: None)

    class Killed(Exception):
        pass

    def kill_at_step_5(message: str) -> None:
        if message.startswith("step 5 "):
            raise Killed

    resumed = tmp_path / "resumed"
    cfg = _tiny_v2_config(tmp_path, 6, "b.pt")
    with pytest.raises(Killed):
        train_reference(cfg, resumed / "out", log=kill_at_step_5)
    assert (tmp_path / "b.pt").is_file()
    messages: list[str] = []
    record = train_reference(cfg, resumed / "out", log=messages.append)
    assert any(m.startswith("resumed from") and m.endswith("at step 4") for m in messages)
    assert record["steps"] == 6 and record["world"] == "v2"
    from safetensors.torch import load_file

    a = load_file(str(straight / "out" / "reference.safetensors"))
    b = load_file(str(resumed / "out" / "reference.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_transposed_batches_are_symmetries_of_the_stored_images(tmp_path):
    from regionsearch.eval.world.batches import TrainingBatches

    pool = build_caption_pool(0, 4)
    rng = np.random.default_rng(0)
    n, size = 16, 12
    images = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    np.savez(
        tmp_path / "shard.npz",
        images=images,
        entry=np.zeros(n, np.int32),
        classes=np.zeros((n, 6), np.int16),
        areas=np.ones((n, 6), np.float32),
    )
    data = TrainingBatches(tmp_path / "shard.npz", pool, (0, 0, 0), (1 / 255,) * 3, transpose=True)
    out = data.images_for(np.arange(n), np.random.default_rng(1))
    transposed = 0
    for i in range(n):
        ref = torch.from_numpy(images[i]).permute(2, 0, 1).float()
        variants = [ref.flip(d) if d else ref for d in ((), (-1,), (-2,), (-1, -2))]
        if any(torch.equal(out[i], v) for v in variants):
            continue
        assert any(torch.equal(out[i], v.transpose(-1, -2)) for v in variants), i
        transposed += 1
    assert 0 < transposed < n


@pytest.mark.slow
@pytest.mark.parametrize(
    ("names", "n_scenes"),
    [
        (("reference", "reference-v2"), 96),
        (("reference-v2", "reference-v3"), 96),
        (("reference-v3", "reference-v4"), 96),
        (("reference-v4", "reference-v5"), 400),
        (("reference-v5", "reference-v6"), 400),
        (("reference-v6", "reference-v8"), 400),
    ],
    ids=["v2-over-v1", "v3-over-v2", "v4-over-v3", "v5-over-v4", "v6-over-v5", "v8-over-v6"],
)
def test_shipped_reference_generalises_better_than_its_predecessor(names, n_scenes):
    """Each shipped reference model beats its predecessor on the held-out family (v2: trained
    on the v2 'train' family; v3: train-dr plus the dense patch loss; v4: v3 trained on with its
    positional embedding trainable; v5: v4 trained on a fresh shard; v6: v5 trained on another
    fresh shard; v8: v6 trained on two fresh 100,000-scene shards on a GPU, v7 being the phase
    between, not shipped). The later pairs differ by a few points, below the noise of 96 scenes,
    so they are compared on more (the same scenes for both models: rendered once when their
    preprocessing agrees)."""
    if not all((MODELS / f"{n}.safetensors").is_file() for n in names):
        pytest.skip("reference weights are not shipped in this checkout")
    from regionsearch.eval.world.reference_model import make_tokenizer
    from regionsearch.eval.world.train_alphaclip import load_reference
    from regionsearch.eval.world.zero_shot import (
        HELDOUT_SINGLE_SIZES,
        class_text_features,
        make_eval_set,
        zero_shot,
    )

    torch.set_num_threads(2)
    acc, eval_sets = {}, {}
    for name in names:
        model, config = load_reference(MODELS, name)
        prep = config["preprocess_cfg"]
        key = (prep["size"], tuple(prep["mean"]), tuple(prep["std"]))
        if key not in eval_sets:
            eval_sets[key] = make_eval_set(
                2025, n_scenes, (1, 1), *key, family="heldout", size_range=HELDOUT_SINGLE_SIZES
            )
        text = class_text_features(model, make_tokenizer(config["model_cfg"]))
        acc[name] = zero_shot(model, text, eval_sets[key])["top1_dominant"]
    assert (MODELS / f"{names[1]}.safetensors").stat().st_size <= 10 * 2**20
    assert acc[names[1]] > acc[names[0]], acc


def test_every_training_world_renders_a_known_family_and_is_in_the_help():
    from regionsearch.eval.world.scene_v2 import FAMILIES
    from regionsearch.eval.world.worlds import TRAINING_WORLDS, worlds_help

    assert {family for family, _ in TRAINING_WORLDS.values()} <= set(FAMILIES)
    assert all(f"{world} (" in worlds_help() for world in ["v1", *TRAINING_WORLDS])


def test_v2dr_world_renders_the_train_dr_family_into_square_shards(tmp_path):
    from regionsearch.eval.world.batches import render_training_shard
    from regionsearch.eval.world.worlds import world_family

    assert world_family("v1") is None and world_family("v2") == "train"
    assert world_family("v2dr") == "train-dr"
    assert world_family("v2dr2") == "train-dr2" and world_family("v2drp") == "train-drp"
    with pytest.raises(ValueError, match="unknown world 'v3'"):
        world_family("v3")
    pool = build_caption_pool(0, 6, same_colour_share=0.5)
    path = render_training_shard(
        tmp_path,
        pool,
        9,
        3,
        24,
        (0.1, 0.5),
        (0.1, 0.4),
        with_masks=True,
        progress=False,
        world="v2dr",
    )
    data = np.load(path)
    assert data["images"].shape == (9, 24, 24, 3)
    masks = np.unpackbits(data["masks"], axis=-1, count=24).astype(bool)
    for i in range(9):
        n = int((data["classes"][i] >= 0).sum())
        assert n == len(pool.entries[data["entry"][i]])
        # Areas are recounted on the squashed masks (at least one pixel).
        assert all(max(masks[i, k].sum(), 1) == data["areas"][i, k] for k in range(n))


def test_freeze_text_proj_keeps_text_vectors_where_they_were(tmp_path):
    from dataclasses import replace as dc_replace

    from safetensors.torch import load_file

    from regionsearch.eval.world.reference_model import build_model
    from regionsearch.eval.world.train_reference import train_reference

    torch.set_num_threads(1)
    cfg = dc_replace(_tiny_v2_config(tmp_path, 3, "f.pt"), freeze_text_proj=True)
    record = train_reference(cfg, tmp_path / "out", log=lambda s: None)
    assert record["freeze_text_proj"] is True
    torch.manual_seed(cfg.seed)  # the run's own initialisation
    init = build_model(cfg.model, load_text_weights=True).state_dict()
    trained = load_file(str(tmp_path / "out" / "reference.safetensors"))
    proj = [k for k in trained if k.startswith("text.proj.")]
    assert proj and all(torch.equal(trained[k], init[k].half()) for k in proj)
    visual = [k for k in trained if k.startswith("visual.")]
    assert any(not torch.equal(trained[k], init[k].half()) for k in visual)


def test_patch_classes_label_the_covering_object_and_ignore_the_rest():
    from regionsearch.eval.world.train_losses import BACKGROUND_PATCH, IGNORE_PATCH, patch_classes

    masks = torch.zeros(1, 2, 16, 16, dtype=torch.bool)
    masks[0, 0, :8, :8] = True  # object 0 fills the top-left patch
    masks[0, 1, 8:, 8:12] = True  # object 1 covers half of the bottom-right patch
    masks[0, 1, 0:3, 8:16] = True  # and 3/8 of the top-right one
    classes = torch.tensor([[5, 9]])
    labels = patch_classes(masks, classes, patch=8)
    assert labels.tolist() == [[5, IGNORE_PATCH, BACKGROUND_PATCH, 9]]
    assert patch_classes(masks, torch.tensor([[-1, 9]]), patch=8)[0, 0] == IGNORE_PATCH


def test_views_flip_patch_labels_with_their_images(tmp_path):
    """Whatever symmetry a batch applies, each labelled patch still shows its object's pixels."""
    from regionsearch.eval.world.batches import TrainingBatches

    pool = build_caption_pool(0, 4)
    rng = np.random.default_rng(0)
    n, size, patch = 24, 16, 4
    masks = np.zeros((n, 6, size, size), dtype=bool)
    images = np.zeros((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        r, c = rng.integers(0, size - 8, size=2)
        masks[i, 0, r : r + 8, c : c + 4] = True  # a tall object: transposes are visible
        images[i][masks[i, 0]] = 255
    np.savez(
        tmp_path / "shard.npz",
        images=images,
        entry=np.zeros(n, np.int32),
        classes=np.concatenate([np.full((n, 1), 7), np.full((n, 5), -1)], 1).astype(np.int16),
        areas=np.ones((n, 6), np.float32),
        masks=np.packbits(masks, axis=-1),
    )
    data = TrainingBatches(tmp_path / "shard.npz", pool, (0, 0, 0), (1 / 255,) * 3, transpose=True)
    x, labels = data.views_for(np.arange(n), np.random.default_rng(3), patch)
    bright = torch.nn.functional.avg_pool2d((x[:, :1] > 127).float(), patch).flatten(1)
    assert labels is not None and labels.shape == (n, (size // patch) ** 2)
    assert torch.equal(labels == 7, bright >= 0.5)
    plain, _ = data.views_for(np.arange(n))
    assert not torch.equal(plain, x)  # symmetries were applied


def test_dense_term_adds_to_the_loss_and_reads_the_same_class_token():
    from regionsearch.backbone.vit import ViTRunner
    from regionsearch.eval.world.train_losses import BACKGROUND_PATCH, IGNORE_PATCH

    torch.manual_seed(0)
    cfg = reference_model_cfg(
        image_size=32, patch_size=8, width=32, layers=1, head_width=16, embed_dim=32
    )
    model = build_model(cfg, load_text_weights=False).eval()
    images = torch.randn(4, 3, 32, 32)
    runner = ViTRunner(model.visual)
    with torch.no_grad():
        tokens = runner.head(runner.run_blocks(runner.embed(images)))
        torch.testing.assert_close(tokens[:, 0], model.encode_image(images), atol=1e-5, rtol=1e-5)
    loss, _ = training_loss(
        model,
        images,
        torch.randn(4, 384),
        torch.randn(0, 384),
        torch.randn(64, 384),
        torch.arange(4),
        torch.full((4, 64), 1 / 64),
    )
    loss.backward()  # every trained part of the tower gets a gradient, positions included
    assert model.visual.positional_embedding.grad is not None
    assert model.visual.positional_embedding.grad.abs().sum() > 0
    args = (images, torch.randn(4, 384), torch.randn(0, 384), torch.randn(64, 384))
    entry, target = torch.arange(4), torch.full((4, 64), 1 / 64)
    patches = torch.full((4, 16), IGNORE_PATCH)
    patches[:, :5] = torch.randint(0, 64, (4, 5))
    plain, parts = training_loss(model, *args, entry, target)
    dense, dense_parts = training_loss(model, *args, entry, target, patches, 0.5)
    assert "dense" not in parts and dense_parts["dense"] > 0
    torch.testing.assert_close(dense - plain, torch.tensor(0.5 * dense_parts["dense"]))
    unlabelled, none_parts = training_loss(
        model, *args, entry, target, torch.full((4, 16), IGNORE_PATCH), 0.5
    )
    assert "dense" not in none_parts and torch.allclose(unlabelled, plain)
    patches[:, 5:] = BACKGROUND_PATCH
    assert "background" not in training_loss(model, *args, entry, target, patches, 0.5)[1]
    with_background, bg_parts = training_loss(model, *args, entry, target, patches, 0.5, 2.0)
    assert bg_parts["background"] >= 0  # 0 only if background patches favour no class
    expected = dense + 2.0 * bg_parts["background"]
    torch.testing.assert_close(with_background, expected)


@pytest.mark.parametrize("command", ["train-reference", "train-alphaclip"])
def test_unknown_world_is_a_usage_error_not_a_traceback(tmp_path, command):
    from typer.testing import CliRunner

    from regionsearch.cli.app import app

    args = ["world", command, "--world", "v9"]
    args += (
        ["--out", str(tmp_path)] if command == "train-reference" else ["--models", str(tmp_path)]
    )
    result = CliRunner().invoke(app, args, terminal_width=200)
    assert result.exit_code == 2
    assert "unknown world 'v9'" in result.output and "v2dr" in result.output
    assert not any(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize(
    ("command", "option"),
    [
        ("train-reference", ["--batch-size", "0"]),
        ("train-reference", ["--n-scenes", "0"]),
        ("train-reference", ["--lr", "0"]),
        ("train-reference", ["--lr", "nan"]),
        ("train-reference", ["--dense-weight", "-1"]),
        ("train-reference", ["--same-colour-share", "2"]),
        ("train-alphaclip", ["--batch-size", "1"]),
        ("train-alphaclip", ["--steps", "0"]),
    ],
)
def test_out_of_range_training_options_are_usage_errors(tmp_path, command, option):
    """Checked by the parser before any rendering or model (--batch-size 0 used to render a
    shard and start a run that could not train)."""
    from typer.testing import CliRunner

    from regionsearch.cli.app import app

    where = (
        ["--out", str(tmp_path)] if command == "train-reference" else ["--models", str(tmp_path)]
    )
    result = CliRunner().invoke(app, ["world", command, *where, *option], terminal_width=200)
    assert result.exit_code == 2 and option[0] in result.output, result.output
    assert not any(tmp_path.iterdir())
