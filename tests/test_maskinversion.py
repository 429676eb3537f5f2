"""MaskInversion and LeGrad: the decomposed fast path must equal the naive reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_masks

from regionsearch.backbone import masks_to_tensor
from regionsearch.embedders import get_embedder
from regionsearch.embedders.legrad import (
    BlockFactors,
    LeGrad,
    relevance_autograd,
    relevance_decomposed,
    relevance_to_maps,
)
from regionsearch.embedders.maskinversion import MaskDice, MaskInversion, bilinear_matrix
from regionsearch.errors import InvalidMaskError


def soft_dice_loss(maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The reference: per-mask soft Dice loss ``1 - (2 sum(E m) + 1) / (sum E + sum m + 1)`` of
    maps built at the masks' resolution, which :class:`MaskDice` computes without building them."""
    inter = (maps * masks).flatten(1).sum(dim=1)
    total = maps.flatten(1).sum(dim=1) + masks.flatten(1).sum(dim=1)
    return 1 - (2 * inter + 1) / (total + 1)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def soft_masks(rng: np.random.Generator, count: int, height: int, width: int) -> np.ndarray:
    """Blurry blobs in [0, 1] with a non-empty core."""
    yy, xx = np.mgrid[0:height, 0:width]
    masks = np.zeros((count, height, width))
    for m in range(count):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        radius = rng.uniform(4, 12)
        masks[m] = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * radius**2))
    return masks


@pytest.mark.parametrize("block", [0, 2])
def test_decomposed_relevance_equals_autograd(tiny_backbone, rng, block):
    runner = tiny_backbone.vit
    pixels = torch.from_numpy(rng.normal(size=(1, 3, 40, 56)))
    tokens = runner.run_blocks(runner.embed(pixels), 0, block)
    queries = torch.from_numpy(rng.normal(size=(7, tiny_backbone.embed_dim)))
    reference = relevance_autograd(runner, block, tokens.expand(7, -1, -1), queries)
    factors = BlockFactors.compute(runner, block, tokens)
    fast = relevance_decomposed(factors, queries, chunk_size=3)
    assert reference.shape == (7, 35)
    assert reference.abs().max() > 1e-6  # not comparing zeros
    assert relative_error(fast, reference) < 1e-10


def test_decomposed_relevance_gradient_equals_double_backward(tiny_backbone, rng):
    runner = tiny_backbone.vit
    pixels = torch.from_numpy(rng.normal(size=(1, 3, 32, 32)))
    last = len(runner.blocks) - 1
    tokens = runner.run_blocks(runner.embed(pixels), 0, last)
    queries = torch.from_numpy(rng.normal(size=(5, tiny_backbone.embed_dim)))
    weights = torch.from_numpy(rng.normal(size=(5, 16)))
    slow_q = queries.clone().requires_grad_(True)
    fast_q = queries.clone().requires_grad_(True)
    (
        relevance_autograd(runner, last, tokens.expand(5, -1, -1), slow_q, True) * weights
    ).sum().backward()
    factors = BlockFactors.compute(runner, last, tokens)
    (relevance_decomposed(factors, fast_q, chunk_size=2) * weights).sum().backward()
    assert relative_error(fast_q.grad, slow_q.grad) < 1e-10


def test_a_reused_gradient_workspace_gives_the_same_relevance_and_gradient(tiny_backbone, rng):
    """Chunks computed into one workspace, each backpropagated before the next, equal fresh
    tensors; backpropagating a chunk whose gradient was overwritten since fails loudly."""
    runner = tiny_backbone.vit
    pixels = torch.from_numpy(rng.normal(size=(1, 3, 32, 32)))
    last = len(runner.blocks) - 1
    factors = BlockFactors.compute(runner, last, runner.run_blocks(runner.embed(pixels), 0, last))
    queries = torch.from_numpy(rng.normal(size=(5, tiny_backbone.embed_dim)))
    weights = torch.from_numpy(rng.normal(size=(5, 16)))
    workspace = factors.gradient_workspace(2)
    for chunk in (slice(0, 2), slice(2, 4), slice(4, 5)):  # the last chunk is shorter
        fresh_q = queries[chunk].clone().requires_grad_(True)
        reused_q = queries[chunk].clone().requires_grad_(True)
        fresh = relevance_decomposed(factors, fresh_q, 2, checkpoint_chunks=False)
        reused = relevance_decomposed(
            factors, reused_q, 2, checkpoint_chunks=False, workspace=workspace
        )
        (fresh * weights[chunk]).sum().backward()
        (reused * weights[chunk]).sum().backward()
        assert torch.equal(fresh, reused) and torch.equal(fresh_q.grad, reused_q.grad)
    first_q = queries[:2].clone().requires_grad_(True)
    first = relevance_decomposed(factors, first_q, 2, checkpoint_chunks=False, workspace=workspace)
    relevance_decomposed(factors, queries[2:4], 2, checkpoint_chunks=False, workspace=workspace)
    with pytest.raises(RuntimeError, match="inplace operation"):
        first.sum().backward()


def test_legrad_maps_batched_over_images_and_queries(tiny_backbone, rng):
    runner = tiny_backbone.vit
    pixels = torch.from_numpy(rng.normal(size=(2, 3, 32, 48)))
    queries = torch.from_numpy(rng.normal(size=(3, tiny_backbone.embed_dim)))
    legrad = LeGrad(runner, layers=2, chunk_size=2)  # chunks of 2 and 1 share one workspace
    maps = legrad.maps(pixels, queries)
    assert maps.shape == (2, 3, 32, 48)
    assert maps.amin() >= 0 and maps.amax() <= 1
    # one image, one query at a time, by autograd, summed over the two last blocks
    for b in range(2):
        tokens = runner.run_blocks(runner.embed(pixels[b : b + 1]), 0, 1)
        for q in range(3):
            total, x = 0, tokens
            for index in (1, 2):
                total = total + relevance_autograd(runner, index, x, queries[q : q + 1])
                x, _ = runner.block(index, x)
            expected = relevance_to_maps(total, (4, 6), (32, 48))[0]
            assert relative_error(maps[b, q], expected) < 1e-8


@pytest.mark.parametrize("count", [1, 3, 17])
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("shape", [(40, 56), (48, 24)])
def test_maskinversion_decomposed_equals_naive(tiny_backbone, rng, count, soft, shape):
    height, width = shape
    image = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    raw = soft_masks(rng, count, height, width) if soft else random_masks(rng, count, height, width)
    masks = masks_to_tensor(raw, (height, width))
    embedder = MaskInversion(tiny_backbone, steps=10, chunk_size=4)
    naive = embedder.invert(image, masks, method="naive")
    fast = embedder.invert(image, masks, method="decomposed")
    assert relative_error(fast.maps, naive.maps) < 1e-5
    assert relative_error(fast.embeddings, naive.embeddings) < 1e-4
    assert naive.losses == pytest.approx(fast.losses, rel=1e-6)
    # the optimisation does something: the embeddings moved away from the image embedding
    first_step = MaskInversion(tiny_backbone, steps=0).invert(image, masks, method="decomposed")
    assert (fast.embeddings - first_step.embeddings).norm(dim=-1).min() > 1e-3


def test_maskinversion_lowers_the_dice_loss(tiny_backbone_f32, rng):
    image = rng.integers(0, 256, size=(40, 56, 3), dtype=np.uint8)
    masks = masks_to_tensor(random_masks(rng, 4, 40, 56), (40, 56))
    result = MaskInversion(tiny_backbone_f32, steps=10).invert(image, masks)
    assert result.losses[-1] < result.losses[0]


def test_embed_is_normalised_deterministic_and_on_cpu(tiny_backbone_f32, random_image, rng):
    embedder = get_embedder("maskinversion", tiny_backbone_f32, steps=3)
    masks = random_masks(rng, 5, *random_image.shape[:2])
    first = embedder.embed(random_image, masks)
    second = embedder.embed(random_image, masks)
    assert first.shape == (5, tiny_backbone_f32.embed_dim)
    assert first.dtype == torch.float32 and first.device.type == "cpu"
    assert torch.allclose(first.norm(dim=-1), torch.ones(5), atol=1e-5)
    assert torch.equal(first, second)


def test_chunk_size_does_not_change_the_result(tiny_backbone, random_image, rng):
    masks = masks_to_tensor(random_masks(rng, 9, *random_image.shape[:2]), random_image.shape[:2])
    a = MaskInversion(tiny_backbone, steps=4, chunk_size=2).invert(
        random_image, masks, "decomposed"
    )
    b = MaskInversion(tiny_backbone, steps=4, chunk_size=9).invert(
        random_image, masks, "decomposed"
    )
    assert relative_error(a.embeddings, b.embeddings) < 1e-10


def test_alpha_keeps_the_embedding_closer_to_the_image(tiny_backbone, random_image, rng):
    masks = masks_to_tensor(random_masks(rng, 3, *random_image.shape[:2]), random_image.shape[:2])
    image_embedding = MaskInversion(tiny_backbone, steps=0).invert(random_image, masks).embeddings
    free = MaskInversion(tiny_backbone, steps=10, alpha=0.0).invert(random_image, masks)
    anchored = MaskInversion(tiny_backbone, steps=10, alpha=5.0).invert(random_image, masks)
    cos_free = (free.embeddings * image_embedding).sum(-1)
    cos_anchored = (anchored.embeddings * image_embedding).sum(-1)
    assert (cos_anchored >= cos_free - 1e-9).all()
    assert (cos_anchored > cos_free).any()


def test_soft_dice_loss_matches_formula():
    maps = torch.tensor([[[1.0, 0.0], [0.5, 0.0]]])
    masks = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    # 1 - (2 * 1.5 + 1) / (1.5 + 2 + 1)
    assert soft_dice_loss(maps, masks).item() == pytest.approx(1 - 4 / 4.5)


@pytest.mark.parametrize(
    ("masks", "message"),
    [
        (np.zeros((0, 40, 56), bool), "no masks"),
        (np.zeros((2, 40, 56), bool), "empty"),
        (np.ones((1, 20, 56), bool), "differs from image size"),
        (np.full((1, 40, 56), 2.0), r"\[0, 1\]"),
        (np.full((1, 40, 56), 3, np.int64), "0/1"),
        (np.ones((1, 1, 40, 56), bool), r"\(M, H, W\)"),
    ],
)
def test_bad_masks_get_clear_errors(tiny_backbone_f32, random_image, masks, message):
    embedder = get_embedder("maskinversion", tiny_backbone_f32, steps=1)
    with pytest.raises(InvalidMaskError, match=message):
        embedder.embed(random_image, masks)


def test_bad_options_are_rejected(tiny_backbone_f32):
    with pytest.raises(ValueError, match="method"):
        MaskInversion(tiny_backbone_f32, method="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="multiple of the patch size"):
        MaskInversion(tiny_backbone_f32, resolution=30)
    for option, value in (("lr", -1.0), ("lr", float("nan")), ("alpha", -0.5)):
        with pytest.raises(ValueError, match=f"{option} must be"):
            MaskInversion(tiny_backbone_f32, **{option: value})
    with pytest.raises(ValueError, match="auto_threshold must be at least 1"):
        MaskInversion(tiny_backbone_f32, auto_threshold=0)


@pytest.mark.parametrize(
    ("grid", "input_size", "mask_size"),
    [((4, 6), (32, 48), (30, 50)), ((5, 5), (40, 40), (64, 24)), ((3, 3), (24, 24), (24, 24))],
)
def test_mask_dice_equals_dice_of_the_resized_map(rng, grid, input_size, mask_size):
    """The grid-projected Dice equals Dice of the map built at the mask's resolution (the
    authors' computation), value and gradient."""
    relevance = torch.from_numpy(rng.random((4, grid[0] * grid[1]))).requires_grad_(True)
    masks = torch.from_numpy(soft_masks(rng, 4, *mask_size))
    masks[0] = masks[0] > 0.5  # one hard mask
    reference = soft_dice_loss(relevance_to_maps(relevance, grid, input_size, mask_size), masks)
    (expected,) = torch.autograd.grad(reference.sum(), relevance)
    fast = MaskDice.build(masks, grid, input_size).loss(relevance)
    (got,) = torch.autograd.grad(fast.sum(), relevance)
    assert reference.min() > 0.05  # a real loss, not a saturated one
    assert relative_error(fast.detach(), reference.detach()) < 1e-12
    assert relative_error(got, expected) < 1e-10


def test_bilinear_matrix_is_torch_bilinear_resize(rng):
    image = torch.from_numpy(rng.random((2, 7, 5)))
    rows = bilinear_matrix(19, 7, image.dtype, image.device)
    cols = bilinear_matrix(13, 5, image.dtype, image.device)
    expected = torch.nn.functional.interpolate(image[None], size=(19, 13), mode="bilinear")[0]
    assert relative_error(rows @ image @ cols.T, expected) < 1e-14


def test_maps_are_the_last_losses_maps_at_mask_resolution(tiny_backbone, random_image, rng):
    """As the authors return them: the map the last loss was computed on, at the mask's size."""
    masks = masks_to_tensor(random_masks(rng, 3, *random_image.shape[:2]), random_image.shape[:2])
    result = MaskInversion(tiny_backbone, steps=4).invert(random_image, masks, "naive")
    assert result.maps.shape == masks.shape
    last = soft_dice_loss(result.maps, masks)
    assert relative_error(last, result.mask_losses[-1]) < 1e-10
    assert result.mask_losses.shape == (4, 3)
    assert result.losses == pytest.approx(result.mask_losses.mean(dim=1).tolist())


def test_one_mask_per_call_equals_all_masks_in_one_call(tiny_backbone, random_image, rng):
    """The loss is summed over masks, so a mask's token never depends on the others."""
    masks = masks_to_tensor(random_masks(rng, 4, *random_image.shape[:2]), random_image.shape[:2])
    embedder = MaskInversion(tiny_backbone, steps=6, lr=0.5)
    together = embedder.invert(random_image, masks, "decomposed").embeddings
    alone = torch.cat(
        [embedder.invert(random_image, masks[m : m + 1]).embeddings for m in range(4)]
    )
    assert relative_error(together, alone) < 1e-10


def test_half_precision_models_run_in_float32(rng, random_image):
    """The authors cast to float32; a bfloat16 model gives the float32 result of its weights."""
    from regionsearch.backbone import Backbone
    from regionsearch.backbone.tiny import tiny_loaded_model

    half = tiny_loaded_model(seed=0)
    half.model.to(torch.bfloat16)
    widened = tiny_loaded_model(seed=0)
    widened.model.load_state_dict({k: v.float() for k, v in half.model.state_dict().items()})
    masks = masks_to_tensor(random_masks(rng, 2, *random_image.shape[:2]), random_image.shape[:2])
    half_backbone = Backbone(half, device="cpu")
    got = MaskInversion(half_backbone, steps=3).invert(random_image, masks)
    expected = MaskInversion(Backbone(widened, device="cpu"), steps=3).invert(random_image, masks)
    assert got.embeddings.dtype == torch.float32
    assert torch.allclose(got.embeddings, expected.embeddings, atol=1e-6)
    assert half_backbone.model.visual.conv1.weight.dtype == torch.bfloat16  # not cast in place


def _backbone_with_config(config: dict):
    from regionsearch.backbone import Backbone
    from regionsearch.backbone.tiny import tiny_loaded_model

    loaded = tiny_loaded_model(seed=0)
    loaded.extra["config"] = config
    return Backbone(loaded, device="cpu")


def test_a_models_config_sets_its_embedder_defaults(tiny_backbone_f32, random_image, rng):
    """Settings a model recorded for an embedder apply when the caller gives none; an explicit
    option wins; a model without any (real CLIP weights) gets the class defaults."""
    backbone = _backbone_with_config(
        {"embedder_defaults": {"maskinversion": {"steps": 2, "lr": 0.3}}}
    )
    chosen = get_embedder("maskinversion", backbone)
    assert (chosen.steps, chosen.lr) == (2, 0.3)
    overridden = get_embedder("maskinversion", backbone, lr=0.05)
    assert (overridden.steps, overridden.lr) == (2, 0.05)
    plain = get_embedder("maskinversion", tiny_backbone_f32)
    assert (plain.steps, plain.lr) == (10, 0.2)
    assert (
        get_embedder("crop", backbone).describe()
        == get_embedder("crop", tiny_backbone_f32).describe()
    )
    masks = masks_to_tensor(random_masks(rng, 2, *random_image.shape[:2]), random_image.shape[:2])
    expected = MaskInversion(tiny_backbone_f32, steps=2, lr=0.3).invert(random_image, masks)
    got = chosen.invert(random_image, masks)
    assert torch.allclose(got.embeddings, expected.embeddings, atol=1e-6)


@pytest.mark.parametrize(
    ("defaults", "message"),
    [
        ({"maskinversion": {"stepz": 5}}, "stepz"),
        ({"maskinversion": 5}, "must map embedder names"),
        ([5], "must map embedder names"),
    ],
)
def test_bad_embedder_defaults_in_a_model_config_are_named(defaults, message):
    backbone = _backbone_with_config({"embedder_defaults": defaults})
    with pytest.raises(ValueError, match=message):
        get_embedder("maskinversion", backbone)


def test_bundled_models_record_only_settings_their_embedders_take():
    """A typo in a bundled model's ``embedder_defaults`` would otherwise surface at index time."""
    from regionsearch.backbone import list_bundled_models
    from regionsearch.backbone.loading import bundled_embedder_defaults
    from regionsearch.embedders import constructor_options

    recorded = {model: bundled_embedder_defaults(model) for model in list_bundled_models()}
    assert recorded["reference-v8"]["maskinversion"] == {"steps": 5, "lr": 0.4}
    for model, defaults in recorded.items():
        for name, settings in defaults.items():
            assert constructor_options(name, settings) == settings, (model, name)
