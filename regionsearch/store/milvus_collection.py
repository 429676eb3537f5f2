"""The Milvus collection behind a :class:`~regionsearch.store.milvus.MilvusBackend`.

Connecting (with errors that name the location), the collection's schema, creating it, and
checking that an existing one is ours: the fields below, the dimension asked for, inner
product, and the index type the location asks for (fixed when the collection is created).
"""

from __future__ import annotations

from typing import Any

from regionsearch.errors import RegionSearchError

from .backend import DimensionMismatchError, ReadOnlyBackendError
from .milvus_location import DEFAULT_INDEX, MilvusLocation, normalize_index_type

ID, IMAGE, VECTOR = "id", "image_id", "vector"
#: ``describe_index`` keys that are facts about the index, not parameters it was built with.
INDEX_FACTS = frozenset(
    {
        "index_type",
        "metric_type",
        "field_name",
        "index_name",
        "total_rows",
        "indexed_rows",
        "pending_index_rows",
        "state",
    }
)


class MilvusError(RegionSearchError, RuntimeError):
    """A Milvus collection that cannot be used as asked (the message names it)."""


class MilvusConnectionError(MilvusError, ConnectionError):
    """Milvus did not answer at the location given."""


class MilvusCollectionNotFoundError(MilvusError, FileNotFoundError):
    """The collection (or the Milvus Lite file) does not exist and was not to be created."""


class MilvusReadOnlyError(MilvusError, ReadOnlyBackendError):
    """A mutation of a backend opened read-only."""


class MilvusDimensionError(MilvusError, DimensionMismatchError):
    """The collection holds vectors of another dimension (RegionIndex: a manifest mismatch)."""


def connect(location: MilvusLocation) -> Any:
    """A connected ``MilvusClient``; a failure becomes :class:`MilvusConnectionError`."""
    from pymilvus import MilvusClient

    try:
        return MilvusClient(
            uri=location.uri,
            token=location.token,
            db_name=location.db_name,
            timeout=location.timeout,
        )
    except Exception as exc:
        hint = (
            " (Milvus Lite opens a file in one process at a time: is another regionsearch "
            "process using it? Use a Milvus server to index and serve at once)"
            if location.lite
            else " (is the server up and reachable? docker compose -f docker/compose.yaml up -d)"
        )
        why = location.scrub(str(exc) or type(exc).__name__)  # the client may echo the token
        raise MilvusConnectionError(
            f"could not connect to Milvus at {location.display}: {why}{hint}"
        ) from None


def create_collection(client: Any, location: MilvusLocation, dimension: int) -> None:
    """The collection: int64 region ids, their image ids (INVERTED index), the vectors (IP)."""
    from pymilvus import DataType, MilvusClient

    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field(ID, DataType.INT64, is_primary=True)
    schema.add_field(IMAGE, DataType.INT64)
    schema.add_field(VECTOR, DataType.FLOAT_VECTOR, dim=dimension)
    index = client.prepare_index_params()
    index.add_index(
        field_name=VECTOR,
        index_type=location.index_type or DEFAULT_INDEX,
        metric_type="IP",
        params=dict(location.build_params),
    )
    index.add_index(field_name=IMAGE, index_type="INVERTED")
    client.create_collection(
        location.collection,
        schema=schema,
        index_params=index,
        consistency_level=location.consistency,
    )


def check_collection(
    client: Any, location: MilvusLocation, dimension: int
) -> tuple[str, dict[str, Any]]:
    """Refuse a collection that is not ours; return its index type and build parameters."""
    from pymilvus import DataType

    info = client.describe_collection(location.collection)
    fields = {f["name"]: f for f in info.get("fields", [])}
    want = {ID: DataType.INT64, IMAGE: DataType.INT64, VECTOR: DataType.FLOAT_VECTOR}
    wrong = [n for n, t in want.items() if n not in fields or fields[n]["type"] != t]
    where = f"collection {location.collection!r} at {location.display}"
    if wrong or not fields[ID].get("is_primary"):
        raise MilvusError(
            f"{where} is not a regionsearch collection (wants fields id INT64 primary, "
            f"image_id INT64, vector FLOAT_VECTOR; found {sorted(fields)})"
        )
    dim = int(fields[VECTOR]["params"].get("dim", -1))
    if dim != dimension:
        raise MilvusDimensionError(f"{where} holds {dim}-d vectors, not {dimension}-d")
    index = client.describe_index(location.collection, VECTOR) or {}
    if str(index.get("metric_type", "IP")).upper() != "IP":
        raise MilvusError(f"{where} compares by {index.get('metric_type')}, not IP")
    held = normalize_index_type(str(index.get("index_type", DEFAULT_INDEX)))
    if location.index_type is not None and location.index_type != held:
        raise MilvusError(
            f"{where} is indexed as {held}, not {location.index_type}: the index type is fixed "
            "when the collection is created (drop ?index= to use it, or index into a new "
            "collection)"
        )
    return held, {k: v for k, v in index.items() if k not in INDEX_FACTS}
