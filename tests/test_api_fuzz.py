"""Property-based fuzzing of the API from its own OpenAPI schema: no input gives a 5xx."""

from __future__ import annotations

import shutil

import pytest

schemathesis = pytest.importorskip("schemathesis")
from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

from regionsearch.api import Settings, create_app  # noqa: E402

try:
    from test_search import build_demo_index
except ImportError:  # pragma: no cover
    from tests.test_search import build_demo_index


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory):
    demo = build_demo_index(tmp_path_factory.mktemp("fuzz"))
    directory = tmp_path_factory.mktemp("fuzz-copy") / "index"
    shutil.copytree(demo.directory, directory)
    app = create_app(
        Settings(index_dir=directory, api_key="fuzz-key", max_upload_bytes=50_000),
        backbone=demo.backbone,
    )
    # One TestClient (lifespan run once: index + model loaded); every generated case is sent
    # through it (schemathesis' own ASGI transport would rerun the lifespan per request).
    global _client
    with TestClient(app) as client:
        _client = client
        loaded = schemathesis.openapi.from_dict(client.get("/openapi.json").json())
        yield loaded


_client: TestClient | None = None
schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(
    max_examples=8,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
def test_no_server_errors(case) -> None:
    kwargs = case.as_transport_kwargs(base_url="http://testserver")
    assert _client is not None
    response = _client.request(
        kwargs.pop("method"),
        kwargs.pop("url"),
        params=kwargs.get("params"),
        headers=kwargs.get("headers"),
        content=kwargs.get("data") if isinstance(kwargs.get("data"), bytes) else None,
        data=kwargs.get("data") if isinstance(kwargs.get("data"), dict) else None,
        files=kwargs.get("files"),
        json=kwargs.get("json"),
    )
    assert response.status_code < 500, (case.method, case.path, case.query, response.text[:300])
