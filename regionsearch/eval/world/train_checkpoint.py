"""Resumable state of a reference-model training run (model, optimiser, step, RNGs, records).

A killed run started again with the same command continues exactly where it stopped: the
trainable weights, the optimiser's moments, both random generators, the loss curve and evals so
far, and the training seconds already spent (progress counts wall time across runs).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from regionsearch.eval.world.reference_model import trainable_state


@dataclass
class Resumed:
    """What a checkpoint restores besides the model, optimiser and RNG states."""

    step: int
    loss_curve: list[dict[str, float]]
    evals: list[dict[str, Any]]
    train_seconds: float


def save_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    rng: np.random.Generator,
    resumed: Resumed,
) -> None:
    """Everything a killed run needs to continue exactly where it stopped (atomic write)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(
        {
            "model": trainable_state(model),
            "optimizer": optimizer.state_dict(),
            "rng": rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
            "step": resumed.step,
            "loss_curve": resumed.loss_curve,
            "evals": resumed.evals,
            "train_seconds": resumed.train_seconds,
        },
        tmp,
    )
    os.replace(tmp, path)


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, rng: np.random.Generator
) -> Resumed | None:
    """Restore ``path`` into ``model``, ``optimizer``, ``rng`` and torch's RNG; ``None`` when
    there is no checkpoint yet."""
    if not path.is_file():
        return None
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(ckpt["model"], strict=False)
    optimizer.load_state_dict(ckpt["optimizer"])
    rng.bit_generator.state = ckpt["rng"]
    torch.set_rng_state(ckpt["torch_rng"])
    return Resumed(ckpt["step"], ckpt["loss_curve"], ckpt["evals"], ckpt["train_seconds"])
