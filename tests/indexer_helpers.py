"""Shared pieces of the indexer tests: a tiny random-weight ``local-dir:`` model, cheap mask
sources and embedders, generated photos, and the SQL/vector consistency check."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from regionsearch.backbone import Backbone
from regionsearch.backbone.tiny import tiny_loaded_model, tiny_model_cfg
from regionsearch.indexer import Indexer
from regionsearch.masks import RegionProposal
from regionsearch.store import RegionIndex


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("model") / "tiny"
    folder.mkdir()
    loaded = tiny_loaded_model(seed=0)
    config = {"model_cfg": tiny_model_cfg(), "preprocess_cfg": {"size": 32}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    torch.save(loaded.model.state_dict(), folder / "open_clip_pytorch_model.bin")
    return folder


@pytest.fixture(scope="module")
def backbone(model_dir) -> Backbone:
    return Backbone.load(f"local-dir:{model_dir}", device="cpu")


class CountingEmbedder:
    """Wraps an embedder and counts ``embed`` calls (the 'no work on re-run' assertions)."""

    def __init__(self, inner):
        self.inner = inner
        self.name = inner.name
        self.backbone = inner.backbone
        self.calls = 0

    def embed(self, image, masks):
        self.calls += 1
        return self.inner.embed(image, masks)


class StripeMasks:
    """Cheap deterministic mask source: 1 + (sum of the first pixel % 3) vertical stripes."""

    def masks_for(self, image_path, image):
        h, w = image.shape[:2]
        n = 1 + int(image[0, 0].sum()) % 3
        out = [RegionProposal(np.ones((h, w), bool), source="full-image")]
        for i in range(n):
            m = np.zeros((h, w), bool)
            m[:, i * w // n : (i + 1) * w // n] = True
            out.append(RegionProposal(m, source="proposal", score=0.5))
        return out


def expected_regions(path: Path) -> int:
    with Image.open(path) as im:
        first = np.asarray(im.convert("RGB"))[0, 0]
    return 2 + int(first.sum()) % 3


def write_image(path: Path, seed: int, size=(40, 32), fmt: str | None = None) -> Path:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    pixels[size[1] // 4 : size[1] // 2, size[0] // 4 : size[0] // 2] = rng.integers(0, 256, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)
    return path


def make_photos(root: Path, n: int = 6) -> list[Path]:
    exts = [".jpg", ".png", ".JPEG", ".webp", ".bmp", ".tif"]
    paths = []
    for i in range(n):
        sub = root / ("sub" if i % 2 else "") / f"p{i:02d}{exts[i % len(exts)]}"
        paths.append(write_image(sub, i))
    (root / "notes.txt").write_text("not an image")
    return paths


def open_index(tmp_path: Path, backbone: Backbone, embedder_name: str, **kw) -> RegionIndex:
    return RegionIndex.create(
        tmp_path / "idx",
        model=backbone.name,
        embedder=embedder_name,
        dimension=backbone.embed_dim,
        **kw,
    )


def live_regions(index: RegionIndex) -> dict[str, list]:
    out: dict[str, list] = {}
    for rec in index.iter_images():
        out[rec.path] = index.regions_of_image(rec.id)
    return out


def run(index, backbone, embedder, source=None, root=None, **kw):
    indexer = Indexer(index, backbone, embedder, source or StripeMasks(), progress=False, **kw)
    return indexer.run(root)
