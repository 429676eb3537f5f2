"""A Milvus collection as the vector engine (:class:`MilvusBackend`, a ``VectorBackend``).

One collection per index, keyed by the SQL region ids::

    id        INT64 primary key (the region id; never reused)
    image_id  INT64 (the owning image, -1 when the caller did not say; INVERTED index)
    vector    FLOAT_VECTOR(d), metric IP on L2-normalised vectors

Where it lives and how it is indexed is one location string (see
:mod:`regionsearch.store.milvus_location`): ``milvus://host:19530/regions?index=HNSW&ef=128``
for a server, ``milvus-lite:///abs/path/vectors.db`` (or a plain ``*.db`` path) for Milvus
Lite, the embedded engine the tests run on.

Consistency: **Strong** by default, for every read. The index has a single writer whose
protocol reads its own writes: ``add`` checks that ids are new, ``remove`` counts what was
present, and ``RegionIndex.reconcile`` asks ``contains`` / ``ids`` which pending regions have
durable vectors; each must see every write acknowledged before it, including those of a writer
that crashed a moment ago (another client, so Milvus's ``Session`` level would not cover it).
Readers (``search``/``serve``) may trade freshness for latency on a busy server with
``?consistency=Bounded`` (results lag writes by Milvus's staleness bound, a few seconds).

Durability: a server makes an insert or delete durable when it acknowledges it (its WAL); Milvus
Lite when it flushes. ``commit()`` flushes (seals what was written, on Lite writes its data
files), then stamps the collection property ``regionsearch.commit`` with a fresh token, which
``refresh()`` on readers compares. Milvus rate-limits flushes on servers; pymilvus retries, and
``RegionIndex`` commits every few minutes, so this costs little.

Deletes are Milvus's own tombstones, dropped by its background compaction, so
``n_tombstones`` is 0 here. A Milvus Lite file is open in one process at a time (it locks the
folder): index and serve against one Lite file in turn, or use a server for both at once.
Lite's embedded server stays up until the process exits (pymilvus shares it between clients);
``close()`` drops this backend's connection.

Search (filter expressions, merged partial results, emulated range search) lives in
:mod:`regionsearch.store.milvus_search`.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from .milvus_collection import (
    ID,
    IMAGE,
    VECTOR,
    MilvusCollectionNotFoundError,
    MilvusConnectionError,
    MilvusDimensionError,
    MilvusError,
    MilvusReadOnlyError,
    check_collection,
    connect,
    create_collection,
)
from .milvus_filters import MAX_TERMS
from .milvus_location import (
    DEFAULT_INDEX,
    SEARCH_KEYS,
    MilvusLocation,
    index_from_factory,
    parse_milvus_url,
)
from .milvus_search import MAX_TOPK, MilvusSearch
from .vector_checks import (
    NORM_TOLERANCE,
    ValidatingBackend,
    VectorValidationError,
    check_ids,
    check_new_ids,
)

COMMIT_PROPERTY = "regionsearch.commit"
NO_IMAGE = -1
INSERT_BATCH = 4096
#: Options other backends take that mean nothing to Milvus (accepted so callers stay generic).
IGNORED_OPTIONS = frozenset(
    {"mmap", "train_size", "compact_every", "rebuild_threshold", "exact_filter_limit"}
)


class MilvusBackend(MilvusSearch, ValidatingBackend):
    """A :class:`~regionsearch.store.backend.VectorBackend` over one Milvus collection."""

    def __init__(
        self,
        client: Any,
        location: MilvusLocation,
        *,
        dimension: int,
        read_only: bool,
        exists: bool,
        norm_tolerance: float = NORM_TOLERANCE,
        max_topk: int = MAX_TOPK,
        filter_terms: int = MAX_TERMS,
    ) -> None:
        self._client = client
        self.location = location
        self.dimension = int(dimension)
        self.read_only = bool(read_only)
        self.norm_tolerance = float(norm_tolerance)
        self.max_topk = int(max_topk)
        self.filter_terms = int(filter_terms)
        self._exists = exists
        self._closed = False
        self._index_type = location.index_type or DEFAULT_INDEX
        self._build_params = dict(location.build_params)
        if exists:
            self._check_schema()
            self._load()
        self._seen_commit = self._commit_token()
        # Rows added without image ids (-1) make ``image_id in [...]`` filters incomplete.
        self._unlabelled = exists and self._has_unlabelled()

    # ------------------------------------------------------------------ opening

    @classmethod
    def open(
        cls,
        location: str | MilvusLocation,
        *,
        dimension: int,
        read_only: bool = False,
        create: bool = True,
        factory: str | None = None,
        **options: Any,
    ) -> MilvusBackend:
        """Connect to ``location``; create the collection if missing and ``create``."""
        loc = location if isinstance(location, MilvusLocation) else parse_milvus_url(location)
        loc = loc.with_index(*index_from_factory(factory))
        norm_tolerance = float(options.pop("norm_tolerance", NORM_TOLERANCE))
        max_topk = int(options.pop("max_topk", MAX_TOPK))
        filter_terms = int(options.pop("filter_terms", MAX_TERMS))
        search = {k: options.pop(k) for k in list(options) if k in SEARCH_KEYS}
        unknown = sorted(set(options) - IGNORED_OPTIONS)
        if unknown:
            raise TypeError(f"unknown Milvus backend options {unknown} for {loc.display}")
        if search:
            loc = replace(loc, search_params={**loc.search_params, **search})
        if loc.lite and not Path(loc.uri).exists():
            if not create:
                raise MilvusCollectionNotFoundError(f"no Milvus Lite file at {loc.uri}")
            Path(loc.uri).parent.mkdir(parents=True, exist_ok=True)
        client = connect(loc)
        try:
            exists = bool(client.has_collection(loc.collection))
            if not exists and create and not read_only:
                create_collection(client, loc, int(dimension))
                exists = True
            elif not exists and not create:
                raise MilvusCollectionNotFoundError(
                    f"no collection {loc.collection!r} at {loc.display} (index into it first)"
                )
            return cls(
                client,
                loc,
                dimension=dimension,
                read_only=read_only,
                exists=exists,
                norm_tolerance=norm_tolerance,
                max_topk=max_topk,
                filter_terms=filter_terms,
            )
        except BaseException:
            client.close()
            raise

    def _check_schema(self) -> None:
        """Refuse a collection that is not ours (see ``check_collection``)."""
        self._index_type, self._build_params = check_collection(
            self._client, self.location, self.dimension
        )

    def _load(self) -> None:
        """Load the collection for search and query (a reopened one starts released)."""
        self._client.load_collection(self.location.collection, timeout=self.location.timeout)

    # ------------------------------------------------------------------ facts

    @property
    def ntotal(self) -> int:
        """Live vectors (a ``count(*)`` query)."""
        if not self._exists:
            return 0
        rows = self._client.query(
            self.location.collection,
            filter="",
            output_fields=["count(*)"],
            consistency_level=self.location.consistency,
        )
        return int(rows[0]["count(*)"]) if rows else 0

    @property
    def n_tombstones(self) -> int:
        """0: Milvus keeps and compacts its own delete records."""
        return 0

    @property
    def on_gpu(self) -> bool:
        """Whether the collection's index is a GPU index (searched on the server's GPU)."""
        return self._index_type.startswith("GPU_")

    def stats(self) -> dict[str, Any]:
        """Engine facts for ``regionsearch stats``."""
        return {
            "kind": "milvus-lite" if self.location.lite else "milvus",
            "location": self.location.display,
            "collection": self.location.collection,
            "vectors": self.ntotal,
            "index_type": self._index_type,
            "build_params": dict(self._build_params),
            "search_params": dict(self.location.search_params),
            "consistency": self.location.consistency,
            "tombstones": 0,
        }

    def __repr__(self) -> str:
        return f"MilvusBackend({self.location.display!r}, d={self.dimension}, {self._index_type})"

    # ------------------------------------------------------------------ writes

    def _writable(self) -> None:
        if self.read_only:
            raise MilvusReadOnlyError(
                f"the Milvus backend at {self.location.display} was opened read-only"
            )
        if self._closed:
            raise MilvusError(f"the Milvus backend at {self.location.display} is closed")

    def add(self, ids: Any, vectors: Any, image_ids: Any = None) -> None:
        """Insert rows; ``image_ids`` (one per id) enable in-engine image filters."""
        self._writable()
        ids = check_new_ids(ids)
        vecs = self.validate_vectors(vectors, n=ids.size)
        if image_ids is None:
            images = np.full(ids.size, NO_IMAGE, dtype=np.int64)
        else:
            images = check_ids(image_ids, "image_ids")
            if images.size != ids.size:
                raise VectorValidationError(f"{images.size} image ids for {ids.size} ids")
        if not ids.size:
            return
        present = self.contains(ids)
        if present.any():
            raise VectorValidationError(
                f"ids already in the collection: {ids[present][:5].tolist()} (ids are never reused)"
            )
        for start in range(0, ids.size, INSERT_BATCH):
            stop = start + INSERT_BATCH
            rows = [
                {ID: int(i), IMAGE: int(g), VECTOR: v}
                for i, g, v in zip(
                    ids[start:stop], images[start:stop], vecs[start:stop], strict=True
                )
            ]
            self._client.insert(self.location.collection, rows)
        self._unlabelled = self._unlabelled or bool((images == NO_IMAGE).any())

    def remove(self, ids: Any) -> int:
        """Delete ``ids`` (hidden from every read at once); return how many were live."""
        self._writable()
        ids = np.unique(check_ids(ids))
        live = ids[self.contains(ids)]
        for chunk in _chunks(live):
            self._client.delete(self.location.collection, ids=chunk.tolist())
        return int(live.size)

    def commit(self) -> None:
        """Flush, then stamp a new commit token for readers' :meth:`refresh`."""
        self._writable()
        self._client.flush(self.location.collection)
        token = uuid.uuid4().hex
        self._client.alter_collection_properties(
            self.location.collection, properties={COMMIT_PROPERTY: token}
        )
        self._seen_commit = token

    # ------------------------------------------------------------------ reads

    def contains(self, ids: Any) -> np.ndarray:
        """Boolean mask of live ``ids`` (bounded ``id in [...]`` queries)."""
        arr = check_ids(ids)
        found: list[int] = []
        if self._exists and arr.size:
            for chunk in _chunks(np.unique(arr)):
                rows = self._client.query(
                    self.location.collection,
                    filter=f"id in [{','.join(map(str, chunk.tolist()))}]",
                    output_fields=[ID],
                    consistency_level=self.location.consistency,
                )
                found += [int(r[ID]) for r in rows]
        return np.isin(arr, np.asarray(found, dtype=np.int64))

    def ids(self) -> np.ndarray:
        """All live ids, sorted (a query iterator: bounded batches, never one huge result)."""
        if not self._exists:
            return np.empty(0, np.int64)
        out = [np.asarray([r[ID] for r in batch], np.int64) for batch in self._iterate()]
        return np.sort(np.concatenate(out)) if out else np.empty(0, np.int64)

    def _iterate(self) -> Iterator[list[dict[str, Any]]]:
        it = self._client.query_iterator(
            self.location.collection,
            batch_size=MAX_TERMS,
            filter=f"id >= {np.iinfo(np.int64).min}",
            output_fields=[ID],
            consistency_level=self.location.consistency,
        )
        try:
            while batch := it.next():
                yield batch
        finally:
            it.close()

    def reconstruct(self, ids: Any) -> np.ndarray:
        """Stored vectors of ``ids`` in order; KeyError naming missing ones."""
        arr = check_ids(ids)
        got: dict[int, Any] = {}
        if self._exists:
            for chunk in _chunks(np.unique(arr)):
                for row in self._client.get(
                    self.location.collection,
                    ids=chunk.tolist(),
                    output_fields=[VECTOR],
                    consistency_level=self.location.consistency,
                ):
                    got[int(row[ID])] = row[VECTOR]
        missing = [i for i in arr.tolist() if i not in got]
        if missing:
            raise KeyError(f"no vectors for ids {missing[:5]} in {self.location.display}")
        out = np.empty((arr.size, self.dimension), dtype=np.float32)
        for row, i in enumerate(arr.tolist()):
            out[row] = got[i]
        return out

    # ------------------------------------------------------------------ readers

    def _commit_token(self) -> str | None:
        if not self._exists:
            return None
        info = self._client.describe_collection(self.location.collection)
        return (info.get("properties") or {}).get(COMMIT_PROPERTY)

    def _has_unlabelled(self) -> bool:
        rows = self._client.query(
            self.location.collection,
            filter=f"image_id == {NO_IMAGE}",
            output_fields=[ID],
            limit=1,
            consistency_level=self.location.consistency,
        )
        return bool(rows)

    def refresh(self) -> bool:
        """True when a writer committed since the last look (reads are live already)."""
        if not self._exists:
            self._exists = bool(self._client.has_collection(self.location.collection))
            if not self._exists:
                return False
            self._check_schema()
            self._load()
        token = self._commit_token()
        if token == self._seen_commit:
            return False
        self._seen_commit = token
        self._unlabelled = self._has_unlabelled()
        return True

    def close(self) -> None:
        """Drop the connection (idempotent)."""
        if not self._closed:
            self._closed = True
            self._client.close()


def _chunks(ids: np.ndarray, size: int = MAX_TERMS) -> Iterator[np.ndarray]:
    for start in range(0, len(ids), size):
        yield ids[start : start + size]


def open_milvus(
    location: str,
    *,
    dimension: int,
    factory: str | None,
    read_only: bool,
    create: bool,
    use_gpu: bool | None = None,
    **options: Any,
) -> MilvusBackend:
    """The registry opener (``store.backends``): GPU use follows the index type, not ``use_gpu``."""
    return MilvusBackend.open(
        location,
        dimension=dimension,
        read_only=read_only,
        create=create,
        factory=factory,
        **options,
    )


__all__ = [
    "MilvusBackend",
    "MilvusCollectionNotFoundError",
    "MilvusConnectionError",
    "MilvusDimensionError",
    "MilvusError",
    "MilvusReadOnlyError",
    "open_milvus",
]
