"""A tiny random-weight CLIP, for tests and timing of code paths (never for quality)."""

from __future__ import annotations

import torch

from regionsearch.backbone.loading import LoadedModel, build_open_clip_model, make_tokenizer


def tiny_model_cfg(
    image_size: int = 32, patch_size: int = 8, width: int = 64, layers: int = 3, heads: int = 4
) -> dict:
    """An open_clip config small enough to run a full MaskInversion in milliseconds."""
    return {
        "embed_dim": 32,
        "vision_cfg": {
            "image_size": image_size,
            "patch_size": patch_size,
            "width": width,
            "layers": layers,
            "head_width": width // heads,
            "mlp_ratio": 4.0,
        },
        "text_cfg": {
            "context_length": 16,
            "vocab_size": 49408,
            "width": 32,
            "heads": 2,
            "layers": 1,
        },
    }


def tiny_loaded_model(seed: int = 0, **cfg_overrides: int) -> LoadedModel:
    """A seeded random tiny CLIP wrapped like any loaded model."""
    cfg = tiny_model_cfg(**cfg_overrides)
    torch.manual_seed(seed)
    model = build_open_clip_model(cfg)
    # Random CLIP init leaves ln/proj scales that make gradients tiny; make them O(1) so that
    # comparisons between implementations test real numbers, not round-off.
    with torch.no_grad():
        for block in model.visual.transformer.resblocks:
            block.attn.in_proj_weight.mul_(4.0)
    model.eval().requires_grad_(False)
    return LoadedModel(
        model=model,
        tokenizer=make_tokenizer(cfg),
        name=f"tiny-random-{seed}",
        image_size=cfg["vision_cfg"]["image_size"],
        extra={"random_init": True},
    )
