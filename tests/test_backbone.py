"""Backbone loading, preprocessing, text encoding and the functional ViT runner."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from regionsearch.backbone import Backbone, ViTRunner, image_to_tensor, loading, parse_model_spec
from regionsearch.backbone.tiny import tiny_loaded_model, tiny_model_cfg
from regionsearch.errors import BackboneLoadError, UnsupportedModelError


def test_runner_matches_open_clip_at_native_size(tiny_backbone, rng):
    pixels = torch.from_numpy(rng.normal(size=(3, 3, 32, 32)))
    expected = tiny_backbone.model.encode_image(pixels)
    assert torch.allclose(tiny_backbone.vit.encode(pixels), expected, atol=1e-10)


def test_any_input_size_without_mutating_the_model(tiny_backbone, rng):
    visual = tiny_backbone.model.visual
    before = {k: v.clone() for k, v in visual.state_dict().items()}
    runner = ViTRunner(visual)
    out = runner.encode(torch.from_numpy(rng.normal(size=(2, 3, 48, 64))))
    assert out.shape == (2, tiny_backbone.embed_dim)
    assert runner.positional_embedding((6, 8), out.device, out.dtype).shape == (49, 64)
    for key, value in visual.state_dict().items():
        assert torch.equal(value, before[key]), key
    # at the native grid the interpolated embedding is the model's own
    native = runner.positional_embedding((4, 4), out.device, out.dtype)
    assert torch.equal(native, visual.positional_embedding)


def test_interpolated_positions_are_smooth_resamplings(tiny_backbone):
    runner = tiny_backbone.vit
    big = runner.positional_embedding((8, 8), torch.device("cpu"), torch.float64)
    assert torch.equal(big[0], tiny_backbone.model.visual.positional_embedding[0])  # CLS kept
    assert torch.isfinite(big).all()


def test_preprocess_resizes_whole_image_without_crop():
    image = np.zeros((20, 80, 3), dtype=np.uint8)
    image[:, :10] = 255  # a white band on the far left survives only without centre crop
    tensor = image_to_tensor(image, 32, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    assert tensor.shape == (3, 32, 32)
    assert tensor[:, :, :3].mean() > 0.9 and tensor[:, :, 8:].mean() < 0.05


def test_preprocess_accepts_pil_grey_rgba_and_float():
    grey = Image.fromarray(np.full((10, 12), 128, np.uint8))
    rgba = np.full((10, 12, 4), 255, np.uint8)
    unit = np.full((10, 12, 3), 0.5, np.float32)
    for image in (grey, rgba, unit):
        assert image_to_tensor(image, 16, (0, 0, 0), (1, 1, 1)).shape == (3, 16, 16)


def test_text_encoding_is_normalised_and_averages_templates(tiny_backbone_f32):
    single = tiny_backbone_f32.encode_text(["a red circle", "a blue star"], templates=None)
    assert single.shape == (2, tiny_backbone_f32.embed_dim)
    assert torch.allclose(single.norm(dim=-1), torch.ones(2), atol=1e-5)
    both = tiny_backbone_f32.encode_text(["red"], templates=["a {}.", "the {}!"])
    parts = tiny_backbone_f32.encode_text(["a red.", "the red!"], templates=None)
    expected = torch.nn.functional.normalize(parts.mean(0, keepdim=True), dim=-1)
    assert torch.allclose(both, expected, atol=1e-5)
    with pytest.raises(ValueError, match="placeholder"):
        tiny_backbone_f32.encode_text(["red"], templates=["no slot"])


@pytest.mark.parametrize(
    ("spec", "pretrained", "expected"),
    [
        ("ViT-B-16/openai", None, ("open_clip", "ViT-B-16", "openai")),
        ("ViT-B-16", "laion2b_s34b_b88k", ("open_clip", "ViT-B-16", "laion2b_s34b_b88k")),
        ("ViT-B-16:/tmp/w.pt", None, ("open_clip", "ViT-B-16", "/tmp/w.pt")),
        ("local-dir:/models/x", None, ("local-dir", "local-dir:/models/x", None)),
        ("ViT-L-14", None, ("open_clip", "ViT-L-14", None)),
    ],
)
def test_parse_model_spec(spec, pretrained, expected):
    assert parse_model_spec(spec, pretrained) == expected


def test_offline_tag_fails_fast_with_one_clear_sentence(monkeypatch):
    monkeypatch.setattr(loading, "hub_reachable", lambda *a, **k: False)
    monkeypatch.setattr(loading, "_cached_checkpoint", lambda cfg: None)
    start = time.perf_counter()
    with pytest.raises(BackboneLoadError) as info:
        loading.load_model("ViT-B-16/openai")
    assert time.perf_counter() - start < 5
    message = str(info.value)
    assert "not cached" in message and "--pretrained" in message and "reference" in message
    assert "--model ViT-B-16-quickgelu " in message  # a local copy of OpenAI weights
    assert "\n" not in message


def test_unknown_model_and_tag_errors():
    with pytest.raises(BackboneLoadError, match="unknown model"):
        loading.load_model("NoSuchNet-7")
    with pytest.raises(BackboneLoadError, match="known tags"):
        loading.load_model("ViT-B-16", pretrained="not-a-tag")


def test_hub_reachable_honours_offline_env(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert loading.hub_reachable() is False


def write_local_dir(tmp_path, seed: int = 0):
    loaded = tiny_loaded_model(seed=seed)
    folder = tmp_path / "tiny"
    folder.mkdir()
    config = {"model_cfg": tiny_model_cfg(), "preprocess_cfg": {"size": 32}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    torch.save(loaded.model.state_dict(), folder / "open_clip_pytorch_model.bin")
    return folder, loaded


def test_local_dir_checkpoint_loads_the_same_weights(tmp_path, rng):
    folder, loaded = write_local_dir(tmp_path)
    backbone = Backbone.load(f"local-dir:{folder}", device="cpu")
    pixels = torch.from_numpy(rng.normal(size=(1, 3, 32, 32))).float()
    assert torch.allclose(backbone.vit.encode(pixels), loaded.model.encode_image(pixels), atol=1e-5)
    assert not any(p.requires_grad for p in backbone.model.parameters())


def test_unsupported_tower_is_refused():
    import open_clip

    model = open_clip.create_model("RN50")
    with pytest.raises(UnsupportedModelError, match="VisionTransformer"):
        ViTRunner(model.visual)


def test_explain_cli_writes_a_png(tmp_path, rng):
    from regionsearch.cli import app

    folder, _ = write_local_dir(tmp_path)
    image_path = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)).save(image_path)
    out = tmp_path / "map.png"
    result = CliRunner().invoke(
        app,
        [
            "explain",
            str(image_path),
            "a cat",
            "a dog",
            "-o",
            str(out),
            "--model",
            f"local-dir:{folder}",
            "--device",
            "cpu",
            "--layers",
            "2",
        ],
    )
    assert result.exit_code == 0, result.output
    with Image.open(out) as written:
        assert written.width == 2 * 50 and written.height > 30


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--layers", "9"], "layers must be in 1.."),
        (["--resolution", "30"], "multiple of the patch size"),
        (["--template", "no slot"], "has no '{}'"),
        (["  "], "a text to explain is empty"),
    ],
)
def test_explain_cli_bad_values_are_usage_errors(tmp_path, rng, extra, message):
    from regionsearch.cli import app

    folder, _ = write_local_dir(tmp_path)
    image_path = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)).save(image_path)
    args = ["explain", str(image_path), "a cat", "--model", f"local-dir:{folder}"]
    result = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "m.png"), *extra])
    assert result.exit_code == 2 and message in result.output, result.output
    assert "Traceback" not in result.output and not (tmp_path / "m.png").exists()


def test_cli_reports_load_errors_as_one_line(monkeypatch, capsys, tmp_path):
    from regionsearch import cli

    monkeypatch.setattr(loading, "hub_reachable", lambda *a, **k: False)
    monkeypatch.setattr(loading, "_cached_checkpoint", lambda cfg: None)
    photo = tmp_path / "photo.png"  # a readable photo: explain checks it before loading
    Image.new("RGB", (16, 16)).save(photo)
    monkeypatch.setattr(
        "sys.argv", ["regionsearch", "explain", str(photo), "x", "-m", "ViT-B-16/openai"]
    )
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == 1  # a runtime error (2 is for usage errors)
    err = capsys.readouterr().err
    assert err.startswith("error: weights for ViT-B-16/openai are not cached")


# ---------------------------------------------------------------------- QuickGELU
def test_quick_gelu_is_chosen_for_weights_trained_with_it(tmp_path):
    import open_clip

    openai = open_clip.get_pretrained_cfg("ViT-B-16", "openai")
    laion = open_clip.get_pretrained_cfg("ViT-B-16", "laion2b_s34b_b88k")
    assert loading.quick_gelu_for("ViT-B-16", openai, None)
    assert not loading.quick_gelu_for("ViT-B-16", laion, None)
    assert loading.quick_gelu_for("ViT-B-16-quickgelu", None, None)
    state_dict_file = tmp_path / "weights.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), state_dict_file)
    assert not loading.quick_gelu_for("ViT-B-16", None, str(state_dict_file))
    with pytest.warns(FutureWarning):  # torch.jit is deprecated, OpenAI's files are TorchScript
        scripted = torch.jit.script(torch.nn.Linear(2, 2))
        torch.jit.save(scripted, str(tmp_path / "ViT-B-16.pt"))
    assert loading.quick_gelu_for("ViT-B-16", None, str(tmp_path / "ViT-B-16.pt"))


def _capture_create_model(monkeypatch) -> dict:
    """Record what ``open_clip.create_model`` is asked for; return a tiny model instead."""
    import open_clip

    calls: dict = {}

    def fake_create_model(name, pretrained=None, **kwargs):
        calls.update(name=name, pretrained=pretrained, **kwargs)
        return tiny_loaded_model(seed=0).model

    monkeypatch.setattr(open_clip, "create_model", fake_create_model)
    return calls


def test_cached_openai_weights_are_built_with_quick_gelu(monkeypatch, tmp_path):
    """A cached tag reaches open_clip as a file path, which carries no activation hint."""
    cached = tmp_path / "open_clip_model.safetensors"
    cached.write_bytes(b"")
    monkeypatch.setattr(loading, "_cached_checkpoint", lambda cfg: str(cached))
    calls = _capture_create_model(monkeypatch)
    loading.load_model("ViT-B-16/openai")
    assert calls["pretrained"] == str(cached) and calls.get("force_quick_gelu") is True
    calls.clear()
    loading.load_model("ViT-B-16", pretrained="laion2b_s34b_b88k")
    assert calls["name"] == "ViT-B-16" and not calls.get("force_quick_gelu")


def test_local_file_takes_an_explicit_quick_gelu_choice(monkeypatch, tmp_path):
    weights = tmp_path / "weights.pt"
    torch.save({}, weights)
    calls = _capture_create_model(monkeypatch)
    loading.load_model(f"ViT-B-16:{weights}")
    assert not calls.get("force_quick_gelu")
    calls.clear()
    loading.load_model(f"ViT-B-16:{weights}", quick_gelu=True)
    assert calls["force_quick_gelu"] is True
    calls.clear()
    loading.load_model(f"ViT-B-16-quickgelu:{weights}", quick_gelu=False)
    assert calls["quick_gelu"] is False


def test_local_dir_config_hint_builds_quick_gelu(tmp_path, rng):
    from open_clip.transformer import QuickGELU

    folder, loaded = write_local_dir(tmp_path)
    config = json.loads((folder / "open_clip_config.json").read_text())
    config["model_cfg"]["quick_gelu"] = True
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    backbone = Backbone.load(f"local-dir:{folder}", device="cpu")
    assert backbone.extra["quick_gelu"] is True
    assert any(isinstance(m, QuickGELU) for m in backbone.model.modules())
    pixels = torch.from_numpy(rng.normal(size=(1, 3, 32, 32))).float()
    gelu = loaded.model.encode_image(pixels)  # same weights, nn.GELU
    assert not torch.allclose(backbone.vit.encode(pixels), gelu, atol=1e-4)
    assert (
        Backbone.load(f"local-dir:{folder}", device="cpu", quick_gelu=False).extra["quick_gelu"]
        is False
    )


def test_a_trained_reference_file_loads_like_the_bundled_one(tmp_path, rng):
    """``--model DIR/NAME.safetensors`` (train-reference's output) is the bundled loader on DIR."""
    import shutil

    from regionsearch.backbone.loading import bundled_models_dir

    for suffix in (".json", ".safetensors"):
        shutil.copy(bundled_models_dir() / f"reference{suffix}", tmp_path / f"mine{suffix}")
    spec = str(tmp_path / "mine.safetensors")
    assert parse_model_spec(spec) == ("reference-file", str(tmp_path / "mine"), None)
    mine, bundled = Backbone.load(spec, device="cpu"), Backbone.load("reference", device="cpu")
    assert mine.name == "mine" and mine.extra["folder"] == tmp_path
    pixels = torch.from_numpy(rng.normal(size=(1, 3, 96, 96))).float()
    assert torch.equal(mine.vit.encode(pixels), bundled.vit.encode(pixels))
    (tmp_path / "mine.json").unlink()
    with pytest.raises(BackboneLoadError, match="recipe"):
        Backbone.load(spec, device="cpu")
