"""A synthetic index for the serving benchmarks: SQLite rows inserted in bulk and query phrases.

``build_sql`` writes ``n_regions`` committed rows (10 regions per image, one fixed RLE) with
``executemany`` in one transaction, not the ORM, so a 20k-region index takes seconds;
``phrases`` are short phrases and referring expressions of colours and things, the kind of text
the bundled reference model knows. Used by ``load_test.py`` and ``text_encoding.py`` (these
helpers lived in ``query_latency.py`` until it moved to realistic vectors).
"""

from __future__ import annotations

import itertools
import json
import sqlite3
import time
from pathlib import Path

import numpy as np

COLOURS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple", "brown", "grey"]
THINGS = [
    "umbrella",
    "dog",
    "cat",
    "car",
    "bicycle",
    "chair",
    "bench",
    "tree",
    "cup",
    "bird",
    "boat",
    "kite",
    "horse",
    "bus",
    "clock",
    "vase",
    "person",
    "sign",
    "ball",
    "bag",
]
PLACES = ["on the left", "on the right", "in the middle", "near the window", "behind the car"]
FAKE_RLE = json.dumps({"size": [480, 640], "counts": "PPYo0a0d:?00O1N2O001N100O1O1N3Mg]i4"})


def phrases(n: int) -> list[str]:
    """``n`` distinct short phrases and referring expressions."""
    out = [f"a {c} {t}" for c, t in itertools.product(COLOURS, THINGS)]
    out += [f"the {c} {t} {p}" for c, t, p in itertools.product(COLOURS, THINGS, PLACES)]
    rng = np.random.default_rng(0)
    rng.shuffle(out)
    return out[:n]


def unit_vectors(n: int, d: int, seed: int, clustered: bool = True) -> np.ndarray:
    """Random unit vectors; ``clustered``: around ``n/50`` random centres (as embeddings are)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, d), np.float32)
    centres = rng.standard_normal((max(1, n // 50), d), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    for start in range(0, n, 100_000):
        block = rng.standard_normal((min(100_000, n - start), d), dtype=np.float32)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        if clustered:
            block = centres[rng.integers(0, len(centres), len(block))] + 0.6 * block
            block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[start : start + len(block)] = block
    return out


def build_sql(directory: Path, n_regions: int, dim: int, model: str) -> float:
    """Index directory with ``n_regions`` committed rows (10 regions/image); returns seconds."""
    from regionsearch.store import RegionIndex, open_database
    from regionsearch.store.regions import refresh_spans

    RegionIndex.create(directory, model=model, embedder="maskinversion", dimension=dim).close()
    t0 = time.perf_counter()
    con = sqlite3.connect(directory / "regions.db")
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=OFF")
    now = "2026-01-01 00:00:00.000000"
    n_images = (n_regions + 9) // 10
    with con:
        con.executemany(
            "INSERT INTO images (id, path, width, height, status, indexed_at, created_at) "
            "VALUES (?, ?, 640, 480, 'indexed', ?, ?)",
            ((i + 1, f"photos/{i // 1000:04d}/img{i:07d}.jpg", now, now) for i in range(n_images)),
        )
        con.executemany(
            "INSERT INTO regions (id, image_id, rle, bbox_x, bbox_y, bbox_w, bbox_h, area, "
            "source, source_score, embedder, vector_state, deleted, created_at) VALUES "
            "(?, ?, ?, 10, 20, 100, 80, 5000, 'proposal', 0.9, 'maskinversion', 'committed', 0, ?)",
            ((r + 1, r // 10 + 1, FAKE_RLE, now) for r in range(n_regions)),
        )
    con.close()
    db = open_database(f"sqlite:///{directory / 'regions.db'}")
    with db.session() as s:
        refresh_spans(s)  # rows written behind the store's back: give images their id spans
    db.dispose()
    return time.perf_counter() - t0
