"""Property-based fuzzing of the API from its own OpenAPI schema: no input gives a 5xx.

Cases come from schemathesis' Hypothesis strategies, driven by Hypothesis directly: schemathesis'
pytest plugin reaches into pytest internals that change between releases (pytest 9.2 removed
``Function._nodeid``, which broke ``schema.parametrize``), and a fuzz test must not depend on that.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

schemathesis = pytest.importorskip("schemathesis")
from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from test_search import build_demo_index  # noqa: E402

from regionsearch.api import Settings, create_app  # noqa: E402

EXAMPLES_PER_OPERATION = 8


@pytest.fixture(scope="module")
def fuzz_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    demo = build_demo_index(tmp_path_factory.mktemp("fuzz"))
    directory = tmp_path_factory.mktemp("fuzz-copy") / "index"
    shutil.copytree(demo.directory, directory)
    app = create_app(
        Settings(index_dir=directory, api_key="fuzz-key", max_upload_bytes=50_000),
        backbone=demo.backbone,
    )
    # One TestClient (lifespan run once: index + model loaded) for every generated case.
    with TestClient(app) as client:
        yield client


def _send(client: TestClient, case) -> int:
    kwargs = case.as_transport_kwargs(base_url="http://testserver")
    data = kwargs.get("data")
    response = client.request(
        kwargs["method"],
        kwargs["url"],
        params=kwargs.get("params"),
        headers=kwargs.get("headers"),
        content=data if isinstance(data, bytes) else None,
        data=data if isinstance(data, dict) else None,
        files=kwargs.get("files"),
        json=kwargs.get("json"),
    )
    assert response.status_code < 500, (case.method, case.path, case.query, response.text[:300])
    return response.status_code


def test_no_server_errors(fuzz_client: TestClient) -> None:
    schema = schemathesis.openapi.from_dict(fuzz_client.get("/openapi.json").json())
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 5, "the schema lost its operations"
    statuses: list[int] = []
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def fuzz(case) -> None:
            statuses.append(_send(fuzz_client, case))

        fuzz()
    # Every operation was exercised, and not only with requests the API turns away.
    assert len(statuses) >= len(operations)
    assert any(200 <= s < 300 for s in statuses)
