"""SQL plumbing shared by the repositories: bulk ``UPDATE``/``DELETE`` and chunked ``IN`` lists."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from sqlalchemy import bindparam, delete, update

#: Ids per ``IN (...)`` list (rendered inline: no bound-parameter limit applies).
SQL_CHUNK = 5000


def chunks(values: Sequence[int], size: int | None = None) -> Iterator[list[int]]:
    """``values`` as lists of at most ``size`` ints (default :data:`SQL_CHUNK`, read per call)."""
    size = size or SQL_CHUNK
    for start in range(0, len(values), size):
        yield [int(v) for v in values[start : start + size]]


def batches(values: Sequence[Any], size: int | None = None) -> Iterator[list[Any]]:
    """``values`` (any type, e.g. paths) as lists of at most ``size`` items."""
    size = size or SQL_CHUNK
    for start in range(0, len(values), size):
        yield list(values[start : start + size])


def bulk_update(model: Any) -> Any:
    """``UPDATE`` without ORM session synchronisation (rows are not loaded)."""
    return update(model).execution_options(synchronize_session=False)


def bulk_delete(model: Any) -> Any:
    """``DELETE`` without ORM session synchronisation (rows are not loaded)."""
    return delete(model).execution_options(synchronize_session=False)


def in_list(column: Any, values: list[int]) -> Any:
    """``column IN (...)`` with the integers rendered inline (no parameter-count limits)."""
    return column.in_(bindparam(f"in_{column.key}", values, expanding=True, literal_execute=True))
