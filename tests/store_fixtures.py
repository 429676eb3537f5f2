"""Fixtures and helpers for the storage tests (imported by tests/test_store_*.py).

``db_url`` is parametrised over SQLite and PostgreSQL. The PostgreSQL variant runs when
``REGIONSEARCH_TEST_PG_URL`` is set (``source .ci/postgres.sh`` starts a local server and sets
it) and is skipped otherwise. Every PostgreSQL test gets its own schema (through the
``search_path`` connection option), dropped afterwards, so tests never see each other's rows.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa

from regionsearch.store.models import Region

PG_ENV = "REGIONSEARCH_TEST_PG_URL"


@pytest.fixture
def faiss_single_thread() -> Iterator[None]:
    """One OpenMP thread for FAISS during a test: on a loaded 2-core machine OpenMP spinning
    makes tiny indexes 10-100x slower. Restored afterwards (other tests are not affected)."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def unit_vectors(n: int, d: int, seed: int = 0) -> np.ndarray:
    """``n`` random L2-normalised float32 vectors of dimension ``d``."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def oracle_search(
    vectors: np.ndarray, ids: np.ndarray, queries: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force inner-product top-k in float64 numpy: (scores, ids), ties broken by id."""
    sims = queries.astype(np.float64) @ vectors.astype(np.float64).T
    out_s = np.full((len(queries), k), -np.inf)
    out_i = np.full((len(queries), k), -1, dtype=np.int64)
    for row, s in enumerate(sims):
        order = np.lexsort((ids, -s))[:k]
        out_s[row, : order.size] = s[order]
        out_i[row, : order.size] = ids[order]
    return out_s, out_i


def make_regions(n: int, *, h: int = 32, w: int = 48, source: str = "proposal") -> list:
    """``n`` NewRegion objects with small valid-looking RLEs (contents are opaque to storage)."""
    from regionsearch.store import NewRegion

    return [
        NewRegion(
            rle={"size": [h, w], "counts": f"{i + 1}0{h * w - i - 1}"},
            bbox=(float(i), 1.0, 5.0 + i, 6.0),
            area=float(10 + i),
            source=source,
            source_score=0.5 + i / (2 * max(n, 1)),
            category=None if i % 2 else f"cat{i}",
            external_id=str(1000 + i),
        )
        for i in range(n)
    ]


def _pg_schema_url(base: str) -> Iterator[str]:
    import sqlalchemy as sa
    from sqlalchemy.engine import make_url

    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(base, poolclass=sa.pool.NullPool)
    with admin.begin() as conn:
        conn.exec_driver_sql(f'CREATE SCHEMA "{schema}"')
    url = make_url(base).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str | None]:
    """``None`` for SQLite (the index's own ``regions.db``) or a fresh PostgreSQL schema URL."""
    if request.param == "sqlite":
        yield None
        return
    base = os.environ.get(PG_ENV)
    if not base:
        pytest.skip(f"{PG_ENV} not set (source .ci/postgres.sh to run the PostgreSQL variant)")
    yield from _pg_schema_url(base)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def raw_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database URL for ``open_database`` tests: a SQLite file or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'test.db'}"
        return
    base = os.environ.get(PG_ENV)
    if not base:
        pytest.skip(f"{PG_ENV} not set (source .ci/postgres.sh to run the PostgreSQL variant)")
    yield from _pg_schema_url(base)


@pytest.fixture
def open_index(db_url: str | None, tmp_path: Path):
    """Factory ``open_index(name="idx", **kwargs)`` -> RegionIndex on the parametrised database.

    Defaults: model "test-model", embedder "test-embedder", dimension 16, create=True,
    automatic checkpoints off. Every index opened through it is closed at teardown.
    """
    from regionsearch.store import RegionIndex

    opened: list[RegionIndex] = []

    def _open(name: str = "idx", **kwargs):
        kwargs.setdefault("db_url", db_url)
        if kwargs.pop("existing", False):
            kwargs.setdefault("create", False)
        else:
            kwargs.setdefault("model", "test-model")
            kwargs.setdefault("embedder", "test-embedder")
            kwargs.setdefault("dimension", 16)
            kwargs.setdefault("create", True)
        kwargs.setdefault("checkpoint_every_s", None)
        kwargs.setdefault("checkpoint_every_vectors", None)
        index = RegionIndex.open(tmp_path / name, **kwargs)
        opened.append(index)
        return index

    _open.db_url = db_url  # type: ignore[attr-defined]
    _open.root = tmp_path  # type: ignore[attr-defined]
    yield _open
    for index in opened:
        try:
            index.close()
        except Exception:
            index._abandon()


def add_image_with_regions(index, path, n_regions, seed=0):
    """An image row at ``path`` with ``n_regions`` random unit vectors (dimension 16)."""
    image = index.upsert_image(path, content_hash=f"hash-{path}", width=48, height=32)
    vecs = unit_vectors(n_regions, 16, seed)
    ids = index.add_image_regions(image.id, make_regions(n_regions), vecs)
    return image, ids, vecs


def region_states(index):
    """``{region id: (vector_state, deleted)}`` of every row."""
    with index.session() as s:
        return {
            int(r.id): (r.vector_state, bool(r.deleted))
            for r in s.execute(sa.select(Region.id, Region.vector_state, Region.deleted))
        }


def assert_consistent(index) -> None:
    """The invariant reconciliation and the indexer keep: every live region row is committed,
    the vector store holds exactly the live ids (each once), and no row is left pending."""
    with index.session() as s:
        rows = list(s.execute(sa.select(Region.id, Region.vector_state, Region.deleted)))
    live = sorted(r.id for r in rows if not r.deleted)
    assert [r.id for r in rows if not r.deleted and r.vector_state != "committed"] == []
    assert [r.id for r in rows if r.vector_state == "pending"] == []
    assert sorted(index.vectors.ids().tolist()) == live
