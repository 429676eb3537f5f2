"""IP-CLIP: per-mask class tokens with an attention mask, checked against a dense reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import random_masks

from regionsearch.backbone import Backbone
from regionsearch.embedders import get_embedder
from regionsearch.embedders.ipclip import IPCLIP, ipclip_attention_mask, select_patches
from regionsearch.errors import InvalidMaskError

INF = float("-inf")
# The tiny ViT runs at 32 px with 8 px patches: a 4 x 4 grid. On the 40 x 56 test image each
# patch is an exact 10 x 14 pixel cell, so coverage can be computed by hand.
CELL = (10, 14)


def reference_coverage(mask: np.ndarray) -> np.ndarray:
    """Fraction of each 10 x 14 cell a 40 x 56 mask covers, row-major: ``(16,)``."""
    return mask.reshape(4, CELL[0], 4, CELL[1]).mean(axis=(1, 3)).reshape(-1)


def reference_embeddings(
    backbone: Backbone, image: np.ndarray, masks: np.ndarray, start: int, threshold: float = 0.5
) -> torch.Tensor:
    """One mask at a time, written out: ``[cls, patches]`` with an explicitly built mask."""
    vit = backbone.vit
    x = vit.embed(backbone.preprocess(image)[None])
    for index in range(start):
        x, _ = vit.block(index, x)
    out = []
    for mask in masks:
        coverage = reference_coverage(mask.astype(np.float64))
        visible = [bool(c >= threshold) for c in coverage]
        if not any(visible):
            visible = [bool(c == coverage.max()) for c in coverage]
        n = 1 + len(coverage)
        attn_mask = torch.zeros(n, n, dtype=torch.float64)
        for key in range(1, n):
            if not visible[key - 1]:
                attn_mask[0, key] = INF  # CLS sees itself and its patches
        for query in range(1, n):
            attn_mask[query, 0] = INF  # patches never see CLS
        y = x
        for index in range(start, len(vit.blocks)):
            y, _ = vit.block(index, y, attn_mask)
        out.append(F.normalize(vit.head(y[0, 0]), dim=-1).float())
    return torch.stack(out)


# ---------------------------------------------------------------------- layout helpers
def test_attention_mask_layout() -> None:
    allowed = torch.tensor([[True, False, True], [False, True, False]])
    expected = torch.tensor(
        [
            [0, INF, 0, INF, 0],
            [INF, 0, INF, 0, INF],
            [INF, INF, 0, 0, 0],
            [INF, INF, 0, 0, 0],
            [INF, INF, 0, 0, 0],
        ]
    )
    assert torch.equal(ipclip_attention_mask(allowed, torch.float32), expected)


def test_select_patches_threshold_and_fallback() -> None:
    coverage = torch.tensor(
        [
            [0.5, 0.9, 0.1, 0.0],  # two patches pass the threshold (>= 0.5)
            [0.2, 0.4, 0.1, 0.0],  # none does: the best one
            [0.3, 0.0, 0.3, 0.1],  # none does, a tie: both best ones
        ]
    )
    expected = torch.tensor(
        [[True, True, False, False], [False, True, False, False], [True, False, True, False]]
    )
    assert torch.equal(select_patches(coverage), expected)
    assert torch.equal(
        select_patches(coverage, threshold=0.95)[0], torch.tensor([0, 1, 0, 0]).bool()
    )


def test_patch_selection_on_the_grid(tiny_backbone: Backbone) -> None:
    embedder = IPCLIP(tiny_backbone)
    masks = torch.zeros(3, 40, 56)
    masks[0, :20, :28] = 1  # exactly the top-left 2 x 2 cells
    masks[1, :5, :7] = 1  # a quarter of cell 0: below threshold, falls back to cell 0
    masks[2, 12:17, 10:18] = 1  # straddles cells 4 and 5 equally (5x4 px each): both
    allowed = embedder.patch_selection(masks)
    assert allowed.shape == (3, 16)
    assert allowed[0].nonzero().flatten().tolist() == [0, 1, 4, 5]
    assert allowed[1].nonzero().flatten().tolist() == [0]
    assert allowed[2].nonzero().flatten().tolist() == [4, 5]


# ---------------------------------------------------------------------- equalities
def test_no_masked_blocks_is_the_plain_embedding(
    tiny_backbone: Backbone, rng, random_image
) -> None:
    depth = len(tiny_backbone.vit.blocks)
    embedder = IPCLIP(tiny_backbone, start_block=depth)
    pixels = tiny_backbone.preprocess(random_image)[None].double()
    plain = F.normalize(tiny_backbone.model.encode_image(pixels), dim=-1).float()
    full = np.ones((1, 40, 56), dtype=bool)
    torch.testing.assert_close(embedder.embed(random_image, full), plain, atol=1e-5, rtol=0)
    # With no masked block the masks cannot matter at all.
    vectors = embedder.embed(random_image, random_masks(rng, 3, 40, 56))
    torch.testing.assert_close(vectors, plain.expand(3, -1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("start", [0, 2])
def test_full_masks_match_the_dense_reference(
    tiny_backbone: Backbone, random_image: np.ndarray, start: int
) -> None:
    full = np.ones((3, 40, 56), dtype=bool)
    vectors = IPCLIP(tiny_backbone, start_block=start).embed(random_image, full)
    expected = reference_embeddings(tiny_backbone, random_image, full[:1], start)
    torch.testing.assert_close(vectors, expected.expand(3, -1), atol=1e-6, rtol=0)
    # Versus the ordinary forward, where patches also attend to CLS: that only matters when a
    # masked block feeds its patch outputs into another one, i.e. from two masked blocks on.
    pixels = tiny_backbone.preprocess(random_image)[None].double()
    plain = F.normalize(tiny_backbone.model.encode_image(pixels), dim=-1).float()
    if start == len(tiny_backbone.vit.blocks) - 1:
        torch.testing.assert_close(vectors[0], plain[0], atol=1e-6, rtol=0)
    else:
        assert (vectors[0] - plain[0]).abs().max() > 1e-4


@pytest.mark.parametrize("count", [1, 3, 17])
def test_random_masks_match_the_dense_reference(
    tiny_backbone: Backbone, rng: np.random.Generator, random_image: np.ndarray, count: int
) -> None:
    masks = random_masks(rng, count, 40, 56)
    if count > 1:
        masks[1] = False
        masks[1, 3:6, 3:6] = True  # a tiny mask: uses the fallback patch
    embedder = IPCLIP(tiny_backbone, chunk_size=5)
    vectors = embedder.embed(random_image, masks)
    assert vectors.shape == (count, tiny_backbone.embed_dim)
    torch.testing.assert_close(vectors.norm(dim=1), torch.ones(count), atol=1e-6, rtol=0)
    expected = reference_embeddings(tiny_backbone, random_image, masks, embedder.start_block)
    torch.testing.assert_close(vectors, expected, atol=1e-6, rtol=0)
    assert torch.equal(vectors, embedder.embed(random_image, masks))


def test_patch_tokens_ignore_the_number_of_masks(
    tiny_backbone: Backbone, rng, random_image
) -> None:
    embedder = IPCLIP(tiny_backbone, start_block=1)
    vit = tiny_backbone.vit
    tokens = vit.run_blocks(vit.embed(tiny_backbone.preprocess(random_image)[None]), 0, 1)
    allowed = embedder.patch_selection(torch.from_numpy(random_masks(rng, 6, 40, 56)).float())
    one = embedder.masked_forward(tokens, allowed[:1])  # (1, 1 + 16, C)
    six = embedder.masked_forward(tokens, allowed)  # (1, 6 + 16, C)
    assert one.shape == (1, 17, vit.width) and six.shape == (1, 22, vit.width)
    torch.testing.assert_close(six[:, 6:], one[:, 1:], atol=1e-12, rtol=0)
    torch.testing.assert_close(six[:, 0], one[:, 0], atol=1e-12, rtol=0)


def test_chunking_does_not_change_results(tiny_backbone: Backbone, rng, random_image) -> None:
    masks = random_masks(rng, 17, 40, 56)
    whole = IPCLIP(tiny_backbone, chunk_size=128).embed(random_image, masks)
    for chunk_size in (1, 4):
        chunked = IPCLIP(tiny_backbone, chunk_size=chunk_size).embed(random_image, masks)
        torch.testing.assert_close(chunked, whole, atol=1e-7, rtol=0)


# ---------------------------------------------------------------------- options and input
def test_options_and_describe(tiny_backbone_f32: Backbone, rng) -> None:
    embedder = get_embedder("ipclip", tiny_backbone_f32, resolution=48, chunk_size=2)
    assert embedder.describe() == {
        "embedder": "ipclip",
        "model": tiny_backbone_f32.name,
        "start_block": 2,  # 2 * 3 // 3: two thirds of the blocks run unmasked
        "threshold": 0.5,
        "chunk_size": 2,
        "resolution": 48,
    }
    image = rng.integers(0, 256, size=(30, 70, 3), dtype=np.uint8)
    assert embedder.embed(image, random_masks(rng, 3, 30, 70)).shape == (3, 32)
    for bad in ({"start_block": 4}, {"start_block": -1}, {"threshold": 0}, {"chunk_size": 0}):
        with pytest.raises(ValueError):
            IPCLIP(tiny_backbone_f32, **bad)


@pytest.mark.parametrize(
    "masks",
    [
        pytest.param(np.zeros((2, 40, 56), dtype=bool), id="empty"),
        pytest.param(np.ones((1, 40, 57), dtype=bool), id="wrong-size"),
        pytest.param(np.zeros((0, 40, 56), dtype=bool), id="zero-masks"),
        pytest.param(np.full((1, 40, 56), -0.5, dtype=np.float32), id="negative"),
    ],
)
def test_bad_masks_rejected(tiny_backbone_f32: Backbone, random_image, masks: np.ndarray) -> None:
    with pytest.raises(InvalidMaskError):
        IPCLIP(tiny_backbone_f32).embed(random_image, masks)
