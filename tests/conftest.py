"""Shared fixtures: tiny random-weight backbones (fast, offline) and the optional shared data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from regionsearch.backbone import Backbone
from regionsearch.backbone.tiny import tiny_loaded_model

#: Fixture modules shared by several test modules (``tests/`` is on ``sys.path``: pytest's
#: default import mode puts the rootdir of this conftest there).
pytest_plugins = ["store_fixtures", "indexer_helpers", "vector_backends"]

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
COCO_TINY = SHARED / "data" / "coco-tiny"


@pytest.fixture(scope="session")
def tiny_backbone() -> Backbone:
    """A 3-block ViT (patch 8, width 64) with random weights, in float64 for exact comparisons."""
    loaded = tiny_loaded_model(seed=0)
    loaded.model.double()
    backbone = Backbone(loaded, device="cpu")
    return backbone


@pytest.fixture(scope="session")
def tiny_backbone_f32() -> Backbone:
    """The same tiny ViT in float32, as embedders normally run."""
    return Backbone(tiny_loaded_model(seed=0), device="cpu")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture
def random_image(rng: np.random.Generator) -> np.ndarray:
    """A 40x56 (non-square) RGB image."""
    return rng.integers(0, 256, size=(40, 56, 3), dtype=np.uint8)


def random_masks(rng: np.random.Generator, count: int, height: int, width: int) -> np.ndarray:
    """``count`` non-empty boolean rectangles."""
    masks = np.zeros((count, height, width), dtype=bool)
    for m in range(count):
        y0, x0 = rng.integers(0, height - 4), rng.integers(0, width - 4)
        y1, x1 = rng.integers(y0 + 2, height + 1), rng.integers(x0 + 2, width + 1)
        masks[m, y0:y1, x0:x1] = True
    return masks


@pytest.fixture
def coco_tiny() -> Path:
    """The shared COCO subset; skips when ``../shared`` is absent."""
    if not (COCO_TINY / "annotations").is_dir():
        pytest.skip("../shared/data/coco-tiny is not available")
    return COCO_TINY


torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    """Three tiny generated world scenes (64 px, 2-3 objects) with expressions."""
    from regionsearch.eval.world.generate import generate_dataset

    folder = tmp_path_factory.mktemp("world")
    generate_dataset(folder, n=3, seed=90417, size=64, min_objects=2, max_objects=3)
    return folder
