"""Realistic region vectors for the ANN and store benchmarks: real embeddings, replicated.

Random vectors are the isotropic worst case for ANN structures (the old query_latency numbers,
recall 0.12-0.39, came from them). Real region embeddings sit in a narrow, anisotropic cone
that IVF and HNSW exploit, so the benchmarks start from real ones:

1. **Base set.** Regions embedded by the product's embedder path (``get_embedder``, MaskInversion
   by default) on the bundled reference model (``regionsearch/models/reference.safetensors``,
   d=256; trained on synthetic coloured shapes only, but a trained model with real structure):
   ground-truth masks of world scenes (``regionsearch world generate``) and of coco-tiny photos
   (train2017 + val2017 instance masks). Cached under ``runs/ann/`` (git-ignored).
2. **Queries.** Text: class names (with the product's prompt templates), "a photo of a ..."
   prompts and the world's referring expressions, through the model's text tower. Image:
   held-out region vectors (``HELDOUT_FRACTION`` of the base, never replicated into the
   database).
3. **Replication** to any size: copy ``i`` is base vector ``i % n_base`` plus noise drawn from
   the base set's covariance (scaled per copy by ``noise * U(0.2, 1)``) plus a small isotropic
   jitter (duplicates never coincide), re-normalised. Consecutive ids come from consecutive base
   regions, i.e. mostly from one real image, as an indexer would assign them.
4. **Dimension.** ``dim`` larger than the model's 256 embeds everything (base, noise and queries)
   with one random orthonormal map, which keeps every inner product: the memory and scan cost of
   d=512 with the neighbourhood structure of the real 256-d vectors (only the jitter uses the
   extra dimensions). Say so when reporting d=512 numbers.

Generation is chunked and deterministic (chunk ``c`` draws from ``default_rng([seed, c])``), so a
10M set can be streamed to disk without holding it.

    python benchmarks/realistic_vectors.py                 # build the cache, print statistics
    python benchmarks/realistic_vectors.py --fixture tests/fixtures/region_vectors_reference.npz
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
CACHE_DIR = REPO / "runs" / "ann"
COCO_TINY = REPO.parent / "shared" / "data" / "coco-tiny"
HELDOUT_FRACTION = 0.1
CHUNK = 100_000


# ----------------------------------------------------------------------------- base set


@dataclass
class BaseSet:
    """Real region vectors with their text queries (all L2-normalised, model dimension)."""

    vectors: np.ndarray  # (n, d) float32
    source: np.ndarray  # (n,) 0 = world, 1 = coco
    image_keys: np.ndarray  # (n,) int64, unique per (source, image)
    text_vectors: np.ndarray  # (t, d) float32
    texts: list[str]
    text_kinds: list[str]  # 'class', 'prompt' or 'expression'
    info: dict[str, Any]

    def split(self, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Indices of the database part and of the held-out image queries (disjoint)."""
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(self.vectors))
        n_held = max(1, round(HELDOUT_FRACTION * len(order)))
        return np.sort(order[n_held:]), np.sort(order[:n_held])


def _datasets(world_dir: Path, coco_dir: Path) -> list[tuple[str, Any]]:
    from regionsearch.eval.datasets import RegionDataset

    out: list[tuple[str, Any]] = [("world", RegionDataset.from_world(world_dir))]
    for split in ("train2017", "val2017"):
        ann = coco_dir / "annotations" / f"instances_{split}.json"
        if ann.is_file():
            out.append((f"coco-{split}", RegionDataset(coco_dir / split, ann)))
    return out


def _embed(datasets: list[tuple[str, Any]], embedder: Any) -> dict[str, Any]:
    """Every ground-truth mask through ``embedder``; class names and expressions alongside."""
    vectors, source, keys = [], [], []
    classes: set[str] = set()
    expressions: list[str] = []
    for source_id, (name, dataset) in enumerate(datasets):
        classes.update(dataset.class_names)
        t0, masks = time.perf_counter(), 0
        for item in dataset:
            vectors.append(embedder.embed(item.image, item.masks).numpy())
            key = (source_id << 32) + int(item.image_id)
            keys.append(np.full(item.num_masks, key, np.int64))
            source.append(np.full(item.num_masks, 0 if name == "world" else 1, np.int8))
            expressions += [s for sents in item.expressions for s in sents]
            masks += item.num_masks
        seconds = time.perf_counter() - t0
        print(f"  {name}: {masks} regions in {seconds:.0f} s", flush=True)
    return {
        "vectors": np.concatenate(vectors).astype(np.float32),
        "source": np.concatenate(source),
        "image_keys": np.concatenate(keys),
        "classes": sorted(classes),
        "expressions": sorted(set(expressions)),
    }


def _text_queries(
    backbone: Any, classes: list[str], expressions: list[str], n_expr: int
) -> tuple[np.ndarray, list[str], list[str]]:
    from regionsearch.backbone.text import DEFAULT_TEMPLATES

    rng = np.random.default_rng(0)
    picked = [expressions[i] for i in sorted(rng.permutation(len(expressions))[:n_expr])]
    prompts = [f"a photo of a {c}" for c in classes]
    parts = [
        (backbone.encode_text(classes, templates=DEFAULT_TEMPLATES), classes, "class"),
        (backbone.encode_text(prompts, templates=None), prompts, "prompt"),
    ]
    if picked:
        parts.append((backbone.encode_text(picked, templates=None), picked, "expression"))
    vecs = np.concatenate([p[0].numpy() for p in parts]).astype(np.float32)
    texts = [t for p in parts for t in p[1]]
    kinds = [p[2] for p in parts for _ in p[1]]
    return vecs, texts, kinds


def load_base(
    embedder: str = "maskinversion",
    world_scenes: int = 1500,
    cache_dir: Path = CACHE_DIR,
    coco_dir: Path = COCO_TINY,
    n_expressions: int = 400,
) -> BaseSet:
    """The cached base set, embedding it first if absent (minutes of CPU; see ``info``)."""
    cache = cache_dir / f"base-{embedder}-world{world_scenes}.npz"
    if not cache.is_file():
        _build_base(cache, embedder, world_scenes, coco_dir, n_expressions)
    with np.load(cache, allow_pickle=False) as z:
        info = json.loads(str(z["info"]))
        return BaseSet(
            vectors=z["vectors"],
            source=z["source"],
            image_keys=z["image_keys"],
            text_vectors=z["text_vectors"],
            texts=[str(t) for t in z["texts"]],
            text_kinds=[str(t) for t in z["text_kinds"]],
            info=info,
        )


def _build_base(
    cache: Path, embedder_name: str, world_scenes: int, coco_dir: Path, n_expressions: int
) -> None:
    import torch

    from regionsearch.backbone import Backbone
    from regionsearch.embedders import get_embedder
    from regionsearch.eval.world.generate import generate_dataset

    torch.set_num_threads(1)
    world_dir = cache.parent / f"world{world_scenes}"
    if not (world_dir / "instances.json").is_file():
        generate_dataset(world_dir, n=world_scenes, seed=11)
    backbone = Backbone.load("reference", device="cpu")
    embedder = get_embedder(embedder_name, backbone)
    t0 = time.perf_counter()
    data = _embed(_datasets(world_dir, coco_dir), embedder)
    embed_s = time.perf_counter() - t0
    text_vectors, texts, kinds = _text_queries(
        backbone, data["classes"], data["expressions"], n_expressions
    )
    info = {
        "model": backbone.name,
        "dimension": int(data["vectors"].shape[1]),
        "embedder": embedder.describe(),
        "world_scenes": world_scenes,
        "coco": str(coco_dir),
        "regions": len(data["vectors"]),
        "embed_seconds": round(embed_s, 1),
        "masks": "ground-truth instance masks (world scenes; coco-tiny train2017 + val2017)",
    }
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(
        tmp,
        vectors=data["vectors"],
        source=data["source"],
        image_keys=data["image_keys"],
        text_vectors=text_vectors,
        texts=np.array(texts),
        text_kinds=np.array(kinds),
        info=np.array(json.dumps(info)),
    )
    tmp.replace(cache)


# ----------------------------------------------------------------------------- replication


def _normalise(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


class Replicator:
    """Streams ``n`` realistic vectors of dimension ``dim`` from a base set (module docstring)."""

    def __init__(
        self,
        base: np.ndarray,
        dim: int | None = None,
        *,
        noise: float = 0.5,
        jitter: float = 0.02,
        seed: int = 0,
    ) -> None:
        base = np.asarray(base, np.float32)
        self.native = base.shape[1]
        self.dim = int(dim or self.native)
        if self.dim < self.native:
            raise ValueError(f"dim {self.dim} is below the base dimension {self.native}")
        self.base = base
        self.noise, self.jitter, self.seed = float(noise), float(jitter), int(seed)
        centred = base - base.mean(axis=0)
        cov = centred.T @ centred / max(1, len(base) - 1)
        eigval, eigvec = np.linalg.eigh(cov.astype(np.float64))
        # rows: principal directions scaled by their standard deviation (noise = z @ shape)
        self.shape = (eigvec * np.sqrt(np.clip(eigval, 0, None))).T.astype(np.float32)
        self.lift = self._lift_matrix()
        self._last: tuple[int, np.ndarray] | None = None

    def _lift_matrix(self) -> np.ndarray | None:
        """``(native, dim)`` with orthonormal rows: inner products are kept exactly."""
        if self.dim == self.native:
            return None
        rng = np.random.default_rng([self.seed, 7919])
        q, _ = np.linalg.qr(rng.standard_normal((self.dim, self.native)))
        return q.T.astype(np.float32)

    def embed(self, vectors: np.ndarray) -> np.ndarray:
        """Queries or base vectors mapped into the benchmark dimension (norms kept)."""
        v = np.asarray(vectors, np.float32)
        return np.ascontiguousarray(v if self.lift is None else v @ self.lift)

    def chunk(self, start: int, stop: int) -> np.ndarray:
        """Vectors ``start..stop`` (must lie in one ``CHUNK``-aligned block or span whole ones)."""
        parts = []
        pos = start
        while pos < stop:
            c = pos // CHUNK
            end = min(stop, (c + 1) * CHUNK)
            parts.append(self._block(c)[pos - c * CHUNK : end - c * CHUNK])
            pos = end
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def _block(self, c: int) -> np.ndarray:
        if self._last is not None and self._last[0] == c:  # callers walk ids in order
            return self._last[1]
        rng = np.random.default_rng([self.seed, c])
        idx = np.arange(c * CHUNK, (c + 1) * CHUNK) % len(self.base)
        scale = self.noise * rng.uniform(0.2, 1.0, (CHUNK, 1)).astype(np.float32)
        z = rng.standard_normal((CHUNK, self.native), dtype=np.float32)
        x = self.base[idx] + scale * (z @ self.shape)
        x = self.embed(_normalise(x))
        x += rng.standard_normal(x.shape, dtype=np.float32) * (self.jitter / np.sqrt(self.dim))
        self._last = (c, _normalise(x))
        return self._last[1]

    def iter_chunks(self, n: int, size: int = CHUNK) -> Iterator[tuple[int, np.ndarray]]:
        """``(start, vectors)`` blocks covering ids ``0..n``."""
        for start in range(0, n, size):
            yield start, self.chunk(start, min(n, start + size))

    def generate(self, n: int) -> np.ndarray:
        """All ``n`` vectors in memory (``n * dim * 4`` bytes)."""
        out = np.empty((n, self.dim), np.float32)
        for start, block in self.iter_chunks(n):
            out[start : start + len(block)] = block
        return out


# ----------------------------------------------------------------------------- ground truth


def exact_topk(
    database: np.ndarray | Iterator[tuple[int | np.ndarray, np.ndarray]],
    queries: np.ndarray,
    k: int = 10,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-``k`` (scores, row numbers) over an array or streamed chunks.

    A chunk is ``(first row, vectors)`` or ``(row numbers, vectors)`` (a filtered subset).
    """
    import faiss

    chunks = [(0, database)] if isinstance(database, np.ndarray) else database
    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_i = np.full((len(queries), k), -1, np.int64)
    for rows, block in chunks:
        if not len(block):
            continue
        s, i = faiss.knn(queries, np.ascontiguousarray(block), k, metric=faiss.METRIC_INNER_PRODUCT)
        found = i + rows if isinstance(rows, int) else np.asarray(rows)[np.maximum(i, 0)]
        s_all = np.concatenate([best_s, s], axis=1)
        i_all = np.concatenate([best_i, np.where(i >= 0, found, -1)], axis=1)
        order = np.argsort(-s_all, axis=1, kind="stable")[:, :k]
        best_s = np.take_along_axis(s_all, order, axis=1)
        best_i = np.take_along_axis(i_all, order, axis=1)
    return best_s, best_i


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each query's true top-k that ``found`` returned."""
    k = truth.shape[1]
    hits = [len(np.intersect1d(f[f >= 0], t[t >= 0])) for f, t in zip(found, truth, strict=True)]
    return float(np.mean(hits)) / k


# ----------------------------------------------------------------------------- CLI


def describe(base: BaseSet) -> dict[str, Any]:
    """Statistics saying how far from isotropic the base set is."""
    v = base.vectors.astype(np.float64)
    mean = v.mean(axis=0)
    eig = np.linalg.eigvalsh(np.cov(v.T))[::-1]
    participation = float(eig.sum() ** 2 / (eig**2).sum())
    return {
        **base.info,
        "world_regions": int((base.source == 0).sum()),
        "coco_regions": int((base.source == 1).sum()),
        "images": len(np.unique(base.image_keys)),
        "text_queries": {k: base.text_kinds.count(k) for k in sorted(set(base.text_kinds))},
        "mean_vector_norm": round(float(np.linalg.norm(mean)), 3),
        "effective_rank_participation": round(participation, 1),
        "text_to_nearest_region_cos_median": round(
            float(np.median((base.text_vectors @ base.vectors.T).max(axis=1))), 3
        ),
    }


def write_fixture(base: BaseSet, path: Path, n_regions: int, n_texts: int, seed: int = 0) -> None:
    """A small committed sample (float16) for tests that need real vectors without a model."""
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.permutation(len(base.vectors))[:n_regions])
    texts = np.sort(rng.permutation(len(base.text_vectors))[:n_texts])
    info = {**base.info, "sampled_regions": len(pick), "sampled_texts": len(texts)}
    np.savez_compressed(
        path,
        vectors=base.vectors[pick].astype(np.float16),
        text_vectors=base.text_vectors[texts].astype(np.float16),
        info=np.array(json.dumps(info)),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--embedder", default="maskinversion")
    parser.add_argument("--world-scenes", type=int, default=1500)
    parser.add_argument("--fixture", type=Path, default=None)
    parser.add_argument("--fixture-regions", type=int, default=600)
    parser.add_argument("--fixture-texts", type=int, default=100)
    args = parser.parse_args()
    base = load_base(args.embedder, args.world_scenes)
    print(json.dumps(describe(base), indent=2))
    if args.fixture:
        write_fixture(base, args.fixture, args.fixture_regions, args.fixture_texts)
        print(f"wrote {args.fixture} ({args.fixture.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
