"""Alpha-CLIP: the alpha branch, official-checkpoint key mapping, and loading into a copy."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import random_masks
from safetensors.torch import save_file

from regionsearch.backbone import Backbone, resize_masks
from regionsearch.backbone.tiny import tiny_loaded_model
from regionsearch.embedders import get_embedder
from regionsearch.embedders.alphaclip import AlphaCLIP, map_alphaclip_keys
from regionsearch.errors import BackboneLoadError, InvalidMaskError


def official_state(visual: torch.nn.Module, alpha: torch.Tensor, prefix: str = "visual.") -> dict:
    """``visual``'s weights under Alpha-CLIP's (OpenAI) names: ``attn.in_proj`` as a Linear."""
    state = {}
    for key, value in visual.state_dict().items():
        key = key.replace("attn.in_proj_weight", "attn.in_proj.weight")
        key = key.replace("attn.in_proj_bias", "attn.in_proj.bias")
        state[prefix + key] = value.clone()
    state[prefix + "conv1_alpha.weight"] = alpha.clone()
    return state


def alpha_weight(backbone: Backbone, scale: float = 0.0, seed: int = 0) -> torch.Tensor:
    conv1 = backbone.model.visual.conv1
    shape = (conv1.out_channels, 1, *conv1.kernel_size)
    return scale * torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def donor() -> torch.nn.Module:
    """Another tiny CLIP (seed 1), standing in for Alpha-CLIP's fine-tuned image tower."""
    return tiny_loaded_model(seed=1).model


def plain_embedding(model: torch.nn.Module, backbone: Backbone, image: np.ndarray) -> torch.Tensor:
    """The ordinary ``encode_image`` of ``model`` on the square-resized image, float64."""
    pixels = backbone.preprocess(image)[None].double()
    return F.normalize(model.double().encode_image(pixels), dim=-1).float()


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


# ---------------------------------------------------------------------- key mapping
@pytest.mark.parametrize("prefix", ["visual.", "", "module.visual."])
def test_key_mapping_to_open_clip_names(tiny_backbone: Backbone, prefix: str) -> None:
    visual = tiny_backbone.model.visual
    state = official_state(visual, alpha_weight(tiny_backbone), prefix)
    assert "transformer.resblocks.0.attn.in_proj.weight" in {k.removeprefix(prefix) for k in state}
    if prefix:  # a full CLIP state dict: text-tower keys are dropped
        state["transformer.resblocks.0.attn.in_proj_weight"] = torch.zeros(3)
        state["logit_scale"] = torch.zeros(())
    mapped = map_alphaclip_keys(state)
    assert set(mapped) == {*visual.state_dict(), "conv1_alpha.weight"}
    for key, value in visual.state_dict().items():
        assert torch.equal(mapped[key], value)
    assert map_alphaclip_keys(mapped).keys() == mapped.keys()  # idempotent


# ---------------------------------------------------------------------- zero alpha
@pytest.mark.parametrize("count", [1, 3, 17])
def test_zero_alpha_equals_plain_model(
    tiny_backbone: Backbone, rng: np.random.Generator, random_image: np.ndarray, count: int
) -> None:
    embedder = AlphaCLIP(tiny_backbone, batch_size=8)
    masks = random_masks(rng, count, *random_image.shape[:2]).astype(np.float32)
    masks[0] *= 0.7  # a soft mask changes nothing either
    vectors = embedder.embed(random_image, masks)
    assert vectors.shape == (count, tiny_backbone.embed_dim)
    torch.testing.assert_close(vectors.norm(dim=1), torch.ones(count), atol=1e-6, rtol=0)
    expected = plain_embedding(tiny_backbone.model, tiny_backbone, random_image)
    torch.testing.assert_close(vectors, expected.expand(count, -1), atol=1e-5, rtol=0)
    assert embedder.runner is tiny_backbone.vit  # no copy without weights


def test_no_weights_warns_and_keeps_global_rng(tiny_backbone: Backbone, caplog) -> None:
    state = torch.get_rng_state()
    with caplog.at_level(logging.WARNING, logger="regionsearch.embedders.alphaclip"):
        embedder = get_embedder("alphaclip", tiny_backbone, resolution=48)
    assert torch.equal(torch.get_rng_state(), state)
    assert "no Alpha-CLIP weights" in caplog.text
    assert embedder.describe() == {
        "embedder": "alphaclip",
        "model": tiny_backbone.name,
        "weights": "none (zero alpha: masks are ignored)",
        "resolution": 48,
        "batch_size": 32,
    }


def test_alpha_maps_resize_like_the_image(tiny_backbone: Backbone) -> None:
    embedder = AlphaCLIP(tiny_backbone, resolution=48)
    masks = torch.zeros(2, 40, 56)
    masks[0] = 1.0
    masks[1, :20] = 1.0  # top half of the image → top half of the square input
    alpha = embedder.alpha_maps(masks)
    assert alpha.shape == (2, 1, 48, 48)
    assert alpha.dtype == torch.float64
    torch.testing.assert_close(alpha[0], torch.full((1, 48, 48), 0.5 / 0.26, dtype=torch.float64))
    high, low = torch.tensor(0.5 / 0.26).double(), torch.tensor(-0.5 / 0.26).double()
    torch.testing.assert_close(alpha[1, 0, :22], high.expand(22, 48))  # bilinear edge: rows 22-25
    torch.testing.assert_close(alpha[1, 0, 26:], low.expand(22, 48))
    assert (alpha[1, 0, 1:] <= alpha[1, 0, :-1] + 1e-6).all()  # monotone across the edge


# ---------------------------------------------------------------------- checkpoints
def test_official_checkpoint_loads_into_a_copy(
    tiny_backbone: Backbone, donor: torch.nn.Module, tmp_path: Path, rng, random_image
) -> None:
    before = snapshot(tiny_backbone.model)
    path = tmp_path / "clip_b16_grit1m_fultune_8xe.pth"
    torch.save(official_state(donor.visual, alpha_weight(tiny_backbone)), path)
    embedder = AlphaCLIP(tiny_backbone, checkpoint=path)
    assert embedder.describe()["weights"] == str(path)
    assert embedder.runner.visual is not tiny_backbone.model.visual
    # Zero alpha: exactly the donor tower's ordinary embedding, so every key landed right.
    vectors = embedder.embed(random_image, random_masks(rng, 3, 40, 56))
    expected = plain_embedding(copy.deepcopy(donor), tiny_backbone, random_image)
    torch.testing.assert_close(vectors, expected.expand(3, -1), atol=1e-5, rtol=0)
    # The user's model is untouched.
    after = tiny_backbone.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_nonzero_alpha_enters_the_patch_embedding(
    tiny_backbone: Backbone, donor: torch.nn.Module, tmp_path: Path, rng, random_image
) -> None:
    weight = alpha_weight(tiny_backbone, scale=0.05, seed=3)
    path = tmp_path / "alpha.pth"
    torch.save({"state_dict": official_state(donor.visual, weight, prefix="")}, path)
    embedder = AlphaCLIP(tiny_backbone, checkpoint=path, batch_size=2)
    masks = random_masks(rng, 3, 40, 56)
    vectors = embedder.embed(random_image, masks)
    # Reference, written out: conv of the normalised, square-resized mask added to conv1(rgb).
    pixels = tiny_backbone.preprocess(random_image).double()
    for index, mask in enumerate(torch.from_numpy(masks).double()):
        alpha = (resize_masks(mask[None], 32) - 0.5) / 0.26
        extra = F.conv2d(alpha[:, None], weight.double(), stride=8)
        expected = F.normalize(embedder.runner.encode(pixels[None], extra), dim=-1).float()
        torch.testing.assert_close(vectors[index : index + 1], expected, atol=1e-5, rtol=0)
    assert (vectors[0] - vectors[1]).abs().max() > 1e-3  # masks matter now
    assert torch.equal(vectors, embedder.embed(random_image, masks))


def test_bundled_file_loads_automatically(donor: torch.nn.Module, tmp_path: Path, rng) -> None:
    loaded = tiny_loaded_model(seed=0)
    loaded.extra["folder"] = tmp_path
    backbone = Backbone(loaded, device="cpu")
    before = snapshot(backbone.model)
    weight = alpha_weight(backbone, scale=0.05)
    state = {f"visual.{k}": v.half() for k, v in donor.visual.state_dict().items()}
    state["visual.conv1_alpha.weight"] = weight.half()
    save_file(state, str(tmp_path / f"{backbone.name}-alphaclip.safetensors"))

    embedder = AlphaCLIP(backbone)
    assert embedder.describe()["weights"] == f"bundled:{backbone.name}-alphaclip.safetensors"
    torch.testing.assert_close(embedder.conv1_alpha.weight, weight.half().float(), atol=0, rtol=0)
    loaded_visual = embedder.runner.visual.state_dict()
    for key, value in donor.visual.state_dict().items():
        assert loaded_visual[key].dtype == torch.float32
        torch.testing.assert_close(loaded_visual[key], value.half().float(), atol=0, rtol=0)
    after = backbone.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    image = rng.integers(0, 256, size=(24, 40, 3), dtype=np.uint8)
    assert embedder.embed(image, random_masks(rng, 2, 24, 40)).shape == (2, backbone.embed_dim)


def test_checkpoint_errors_name_the_keys(tiny_backbone: Backbone, donor, tmp_path: Path) -> None:
    state = official_state(donor.visual, alpha_weight(tiny_backbone))
    broken = dict(state)
    del broken["visual.conv1_alpha.weight"]
    del broken["visual.ln_post.bias"]
    broken["visual.transformer.resblocks.0.attn.in_proj.lora_A"] = torch.zeros(4, 64)
    path = tmp_path / "broken.pth"
    torch.save(broken, path)
    with pytest.raises(BackboneLoadError) as error:
        AlphaCLIP(tiny_backbone, checkpoint=path)
    message = str(error.value)
    assert "missing keys: ln_post.bias, conv1_alpha.weight" in message
    assert "unexpected keys: transformer.resblocks.0.attn.in_proj.lora_A" in message

    other = tiny_loaded_model(seed=1, image_size=48).model.visual  # positional grid 6x6, not 4x4
    torch.save(official_state(other, alpha_weight(tiny_backbone)), path)
    with pytest.raises(BackboneLoadError, match=r"positional_embedding \(37, 64\) vs \(17, 64\)"):
        AlphaCLIP(tiny_backbone, checkpoint=path)

    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(BackboneLoadError, match="could not read"):
        AlphaCLIP(tiny_backbone, checkpoint=tmp_path / "garbage.pth")
    with pytest.raises(BackboneLoadError, match="not found"):
        AlphaCLIP(tiny_backbone, checkpoint=tmp_path / "absent.pth")


# ---------------------------------------------------------------------- input checks
@pytest.mark.parametrize(
    "masks",
    [
        pytest.param(np.zeros((2, 40, 56), dtype=bool), id="empty"),
        pytest.param(np.ones((1, 56, 40), dtype=bool), id="wrong-size"),
        pytest.param(np.zeros((0, 40, 56), dtype=bool), id="zero-masks"),
        pytest.param(np.full((1, 40, 56), 1.01, dtype=np.float32), id="above-one"),
    ],
)
def test_bad_masks_rejected(tiny_backbone_f32: Backbone, random_image, masks: np.ndarray) -> None:
    with pytest.raises(InvalidMaskError):
        AlphaCLIP(tiny_backbone_f32).embed(random_image, masks)


def test_options_validated(tiny_backbone_f32: Backbone) -> None:
    with pytest.raises(ValueError, match="multiple of the patch size"):
        AlphaCLIP(tiny_backbone_f32, resolution=36)
    with pytest.raises(ValueError, match="batch_size"):
        AlphaCLIP(tiny_backbone_f32, batch_size=0)
