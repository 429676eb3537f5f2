"""Every :class:`~regionsearch.store.backend.VectorBackend` the contract tests run against.

One :class:`BackendCase` per engine: where a fresh one lives under ``tmp_path`` and which
module must exist for it to run. A case whose module is not there yet is skipped with the
reason. Adding an engine to the contract suite is one entry in :data:`CASES`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest


@dataclass(frozen=True)
class BackendCase:
    """How to get a fresh location for one engine and open it."""

    name: str
    module: str  # must be importable for the case to run
    location: Callable[[Path], str]  # a fresh location under tmp_path
    factory: str | None = None  # None: the engine's default (exact search)
    options: dict[str, Any] = field(default_factory=dict)

    def skip_reason(self) -> str | None:
        try:
            found = importlib.util.find_spec(self.module) is not None
        except ModuleNotFoundError:
            found = False
        return None if found else f"{self.module} does not exist yet ({self.name} backend)"

    def open(
        self,
        location: str,
        *,
        dimension: int,
        read_only: bool = False,
        create: bool = True,
        **options: Any,
    ) -> Any:
        from regionsearch.store.backends import open_vector_backend

        return open_vector_backend(
            location,
            dimension=dimension,
            factory=self.factory,
            read_only=read_only,
            create=create,
            use_gpu=False,
            **{**self.options, **options},
        )


CASES: tuple[BackendCase, ...] = (
    BackendCase("faiss", "regionsearch.store.vectors", lambda tmp: str(tmp / "vectors.faiss")),
    BackendCase(
        "faiss-segments", "regionsearch.store.segments", lambda tmp: str(tmp / "vectors.segments")
    ),
    BackendCase("milvus-lite", "regionsearch.store.milvus", lambda tmp: str(tmp / "vectors.db")),
)


@pytest.fixture(params=[c.name for c in CASES])
def backend_case(request: pytest.FixtureRequest) -> BackendCase:
    """Each registered backend case in turn (skipped while its module is missing)."""
    case = next(c for c in CASES if c.name == request.param)
    reason = case.skip_reason()
    if reason:
        pytest.skip(reason)
    return case
