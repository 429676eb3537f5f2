"""Milvus Lite as the vector engine, end to end: index, search, API, and a SIGKILL mid-index.

One generated world folder (``regionsearch world generate``) is indexed twice through the CLI
with the bundled reference model: once into an exact single-file FAISS index, once with
``--vectors milvus-lite:///.../vectors.db``. Both runs store the same rows in the same order,
so the two indexes must answer every search (CLI and HTTP API, filtered or not) with the same
region ids in the same order and the same scores. The crash test reuses the SIGKILL scenario of
tests/test_indexer.py with PostgreSQL as the SQL side and Milvus Lite as the vector side.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")


from store_fixtures import PG_ENV, _pg_schema_url
from test_indexer_crash import _crash_scenario

from regionsearch.api import Settings, create_app
from regionsearch.backbone import load_backbone
from regionsearch.cli import app
from regionsearch.eval.world.cli import world_app
from regionsearch.store import RegionIndex

pytestmark = pytest.mark.slow  # two indexing runs of a small world, then many searches

QUERIES = ("a red circle", "a blue square", "something green", "a small yellow triangle")
PATH_GLOB = "*[13579].png"  # five non-adjacent images: more ranges than an id expression takes


def _invoke(*args: str) -> Any:
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture(scope="module")
def indexes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same ten world photos indexed into FAISS and into Milvus Lite."""
    world = tmp_path_factory.mktemp("world")
    generated = CliRunner().invoke(
        world_app, ["generate", str(world), "--n", "10", "--size", "64", "--seed", "5"]
    )
    assert generated.exit_code == 0, generated.output
    root = tmp_path_factory.mktemp("indexes")
    built = {"faiss": root / "faiss", "milvus": root / "milvus"}
    vectors = {  # the exact single-file FAISS index is the reference, whatever the default
        "faiss": ["--vectors", str(built["faiss"] / "vectors.faiss")],
        "milvus": ["--vectors", f"milvus-lite://{root}/vectors.db"],
    }
    for name, directory in built.items():
        _invoke(
            "index", str(world / "images"), "--name", str(directory), "-e", "masked-crop",
            "--workers", "0", "--no-progress", *vectors[name],
        )  # fmt: skip
    return built


def _search(directory: Path, *args: str) -> list[dict[str, Any]]:
    out = _invoke("search", *args, "--name", str(directory), "--json", "--plain")
    return json.loads(out.stdout)["results"]


def _same_hits(a: list[dict[str, Any]], b: list[dict[str, Any]], key: str = "region_id") -> None:
    assert [h[key] for h in a] == [h[key] for h in b]
    assert [h["image_path"] for h in a] == [h["image_path"] for h in b]
    np.testing.assert_allclose([h["score"] for h in a], [h["score"] for h in b], atol=1e-5)


def test_both_runs_store_the_same_counts_and_name_their_backend(indexes):
    stats = {}
    for name, directory in indexes.items():
        with RegionIndex.open(directory, read_only=True) as index:
            s = index.stats()
            stats[name] = (s.images, s.regions, s.vectors, index.vectors.ntotal)
            assert (
                index.manifest.vector_backend == {"faiss": "faiss", "milvus": "milvus-lite"}[name]
            )
    assert stats["faiss"] == stats["milvus"] and stats["milvus"][1] > 30
    on_disk = json.loads((indexes["milvus"] / "manifest.json").read_text())
    assert on_disk["vector_backend"] == "milvus-lite" and on_disk["extra"]["vectors"].endswith(
        ".db"
    )


@pytest.mark.parametrize("query", QUERIES)
def test_cli_search_returns_the_same_top_k(indexes, query):
    for extra in ((), ("--path", PATH_GLOB), ("--one-per-image",)):
        faiss_hits = _search(indexes["faiss"], query, "--k", "12", *extra)
        milvus_hits = _search(indexes["milvus"], query, "--k", "12", *extra)
        assert len(faiss_hits) == 12 or extra == ("--one-per-image",)
        _same_hits(faiss_hits, milvus_hits)
    assert {
        h["image_path"][-5] for h in _search(indexes["milvus"], query, "--path", PATH_GLOB)
    } <= set("13579")


def test_cli_similar_returns_the_same_regions(indexes):
    region = _search(indexes["faiss"], QUERIES[0], "--k", "1")[0]["region_id"]
    found = {
        name: json.loads(
            _invoke("similar", str(region), "--name", str(d), "--k", "8", "--json").stdout
        )["results"]
        for name, d in indexes.items()
    }
    _same_hits(found["faiss"], found["milvus"])


@pytest.fixture(scope="module")
def clients(indexes) -> Iterator[dict[str, TestClient]]:
    backbone = load_backbone("reference", device="cpu")
    with (
        TestClient(create_app(Settings(index_dir=indexes["faiss"]), backbone=backbone)) as a,
        TestClient(create_app(Settings(index_dir=indexes["milvus"]), backbone=backbone)) as b,
    ):
        yield {"faiss": a, "milvus": b}


def test_api_returns_the_same_counts_and_top_k(clients):
    stats = {n: c.get("/api/stats").json() for n, c in clients.items()}
    for key in ("images", "regions", "vectors"):
        assert stats["faiss"][key] == stats["milvus"][key], key
    for query in QUERIES:
        for params in ({"k": 15}, {"k": 15, "path": PATH_GLOB}):
            got = {
                n: c.get("/api/search", params={"q": query, **params}).json()
                for n, c in clients.items()
            }
            assert got["faiss"]["count"] == got["milvus"]["count"]
            _same_hits(got["faiss"]["results"], got["milvus"]["results"], key="id")


@pytest.fixture
def pg_url() -> Iterator[str]:
    base = os.environ.get(PG_ENV)
    if not base:
        pytest.skip(f"{PG_ENV} not set (source .ci/postgres.sh to run the PostgreSQL variant)")
    yield from _pg_schema_url(base)


@pytest.mark.postgres
def test_sigkill_mid_index_with_postgres_and_milvus_lite(tmp_path, model_dir, pg_url):
    import sqlalchemy as sa

    engine = sa.create_engine(pg_url, poolclass=sa.pool.NullPool)

    def rows() -> int:
        try:
            with engine.connect() as conn:
                return int(conn.execute(sa.text("select count(*) from regions")).scalar_one())
        except sa.exc.DBAPIError:  # the table is not created yet
            return 0

    vectors = f"milvus-lite://{tmp_path}/vectors.db"
    try:
        _crash_scenario(
            tmp_path, model_dir, seed=0, kills=2, checkpoint_s=1.0, max_delay=0.3,
            extra_args=["--db-url", pg_url, "--vectors", vectors],
            count_rows=rows,
            open_kwargs={"db_url": pg_url},
        )  # fmt: skip
    finally:
        engine.dispose()
    with RegionIndex.open(tmp_path / "indexes" / "crash", db_url=pg_url, read_only=True) as index:
        assert index.manifest.vector_backend == "milvus-lite"
        assert index.stats().vectors == index.vectors.ntotal == index.vectors.ids().size
