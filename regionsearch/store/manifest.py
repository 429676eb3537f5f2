"""The index manifest: what the vectors of an index are, checked on every open.

An index holds vectors of exactly one (model, embedder, dimension, metric). Mixing vectors of two
models in one FAISS index gives meaningless scores without any error, so opening an index with a
different identity raises :class:`IndexMismatchError`, which says what the index holds, what was
asked for, and how to proceed (another ``--name``).

The source of truth is the ``manifest`` table in the index database; ``manifest.json`` in the
index directory is a copy for humans and tools (and tells which database a directory uses).

The manifest also records the embedder's full description (``RegionEmbedder.describe()``: its
name, model and every option that shapes the vectors, e.g. MaskInversion's ``steps``), under
``extra["embedder_description"]``. A run whose embedder describes itself otherwise is refused
with :class:`EmbedderMismatchError`, naming the differing option; the server rebuilds the
embedder for uploads from it. Options that only change speed or memory (:data:`SPEED_ONLY`)
are recorded but may differ between runs. Indexes made before descriptions were recorded have
none: the first run (or upload) that writes to such an index is accepted as it is, and records
its own description, which later runs must then match.

Where the vectors live is ``extra["vectors"]`` (a location ``store.backends`` opens: a Milvus
URL, a FAISS file...), written when an index is created elsewhere than its default FAISS file;
a manifest without it (every index made before other engines existed) means FAISS.
:attr:`ManifestInfo.vector_backend` names the engine, and ``manifest.json`` shows it. A URL is
recorded without its password (:func:`~regionsearch.store.milvus_location.without_password`;
the backend takes it at open time), and :meth:`ManifestInfo.to_json` strips one again so that
a manifest written before that rule never copies a password into ``manifest.json``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from regionsearch.errors import RegionSearchError

from .milvus_location import without_password
from .models import METRIC_IP, SCHEMA_VERSION

LOG = logging.getLogger(__name__)

MANIFEST_JSON = "manifest.json"
IDENTITY_FIELDS = ("model", "embedder", "dimension", "metric")
DESCRIPTION_KEY = "embedder_description"
#: Described options that change how fast vectors are made (batching), never the vectors.
SPEED_ONLY = frozenset({"batch_size", "chunk_size"})
#: ``extra`` key of a vector location other than the index folder's default FAISS file.
VECTORS_KEY = "vectors"


class IndexMismatchError(RegionSearchError, ValueError):
    """An index was opened with a model/embedder/dimension/factory other than its own."""

    def __init__(
        self,
        name: str,
        held: dict[str, Any],
        requested: dict[str, Any],
        *,
        location: str | None = None,
        reason: str | None = None,
    ) -> None:
        self.name = name
        self.held = dict(held)
        self.requested = dict(requested)
        self.differences = {
            k: (held.get(k), v) for k, v in requested.items() if v is not None and held.get(k) != v
        }
        where = f" at {location}" if location else ""
        holds = ", ".join(f"{k}={held.get(k)!r}" for k in held)
        asked = ", ".join(f"{k}={v!r}" for k, v in requested.items() if v is not None)
        diff = "; ".join(
            f"{k}: index has {a!r}, asked {b!r}" for k, (a, b) in self.differences.items()
        )
        why = reason or (
            "Vectors from different models, embedders or dimensions cannot share one index "
            "(their scores are not comparable)."
        )
        message = (
            f"Index {name!r}{where} holds {holds}.\n"
            f"You asked for {asked} ({diff}).\n"
            f"{why}\n"
            f"To proceed: build a separate index under another name (e.g. --name "
            f"{_suggest_name(name, self.differences)}), or open this one with its own settings "
            f"(--model {held.get('model')!r} --embedder {held.get('embedder')!r})."
        )
        super().__init__(message)


class EmbedderMismatchError(RegionSearchError, ValueError):
    """A run's embedder options differ from those the index's vectors were made with."""

    def __init__(self, name: str, embedder: str, differing: dict[str, tuple[Any, Any]]) -> None:
        self.name = name
        self.differing = dict(differing)
        diff = "; ".join(
            f"{k}: index has {held!r}, this run {asked!r}" for k, (held, asked) in differing.items()
        )
        super().__init__(
            f"index {name!r} was made with other {embedder} options ({diff}): run with the "
            "index's own options (see manifest.json), or build another index with --name"
        )


def _suggest_name(name: str, differences: dict[str, tuple[Any, Any]]) -> str:
    """A new index name tagged with the setting that differs (the asked embedder, else model)."""
    asked = {key: wanted for key, (_, wanted) in differences.items()}
    tag = asked.get("embedder") or asked.get("model") or "new"
    tag = "".join(c if c.isalnum() or c in "-_" else "-" for c in str(tag)).strip("-").lower()
    return f"{name}-{tag}" if tag else f"{name}-2"


@dataclass
class ManifestInfo:
    """Plain copy of the manifest row (detached from any session)."""

    name: str
    model: str
    embedder: str
    dimension: int
    metric: str = METRIC_IP
    factory: str = "IDMap2,Flat"
    schema_version: int = SCHEMA_VERSION
    image_root: str | None = None
    n_images: int = 0
    n_regions: int = 0
    n_vectors: int = 0
    database: str | None = None  # SQLAlchemy URL without password (JSON copy only)
    created_at: str | None = None
    updated_at: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_row(cls, row: Any, *, database: str | None = None) -> ManifestInfo:
        return cls(
            name=row.name,
            model=row.model,
            embedder=row.embedder,
            dimension=int(row.dimension),
            metric=row.metric,
            factory=row.factory,
            schema_version=int(row.schema_version),
            image_root=row.image_root,
            n_images=int(row.n_images or 0),
            n_regions=int(row.n_regions or 0),
            n_vectors=int(row.n_vectors or 0),
            database=database,
            created_at=_iso(row.created_at),
            updated_at=_iso(row.updated_at),
            extra=dict(row.extra or {}),
        )

    @property
    def embedder_description(self) -> dict[str, Any] | None:
        """The recorded ``describe()`` of the embedder; None for indexes made before it was."""
        value = self.extra.get(DESCRIPTION_KEY)
        return dict(value) if isinstance(value, dict) else None

    @property
    def embedder_options(self) -> dict[str, Any] | None:
        """The recorded settings without the embedder and model names (what ``stats`` shows);
        None for indexes made before they were recorded."""
        described = self.embedder_description
        if described is None:
            return None
        return {k: v for k, v in described.items() if k not in ("embedder", "model")}

    @property
    def vectors_location(self) -> str | None:
        """The recorded vector location; None: the default FAISS file of the index folder."""
        value = self.extra.get(VECTORS_KEY)
        return str(value) if value is not None else None

    @property
    def vector_backend(self) -> str:
        """The vector engine (``faiss``, ``milvus``, ``milvus-lite``, ...), from the location."""
        from .backends import scheme_for

        location = self.vectors_location
        return "faiss" if location is None else scheme_for(location).name

    def identity(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in IDENTITY_FIELDS}

    def to_json(self) -> dict[str, Any]:
        """The ``manifest.json`` copy: every field, the engine, no password in a location."""
        data = {**asdict(self), "vector_backend": self.vector_backend}
        if self.vectors_location is not None:
            data["extra"] = {**self.extra, VECTORS_KEY: without_password(self.vectors_location)}
        return data


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def check_manifest(
    held: ManifestInfo,
    *,
    model: str | None = None,
    embedder: str | None = None,
    dimension: int | None = None,
    metric: str | None = None,
    factory: str | None = None,
    location: str | None = None,
) -> None:
    """Raise :class:`IndexMismatchError` unless every given value matches ``held``.

    ``None`` means "whatever the index holds" (e.g. a search command reading the model name
    from the manifest). ``factory`` is compared after normalisation (``IDMap2,`` prefix).
    """
    from .vectors import normalize_factory

    requested: dict[str, Any] = {
        "model": model,
        "embedder": embedder,
        "dimension": int(dimension) if dimension is not None else None,
        "metric": metric,
    }
    identity = held.identity()
    if any(v is not None and identity[k] != v for k, v in requested.items()):
        raise IndexMismatchError(held.name, identity, requested, location=location)
    if factory is not None and normalize_factory(factory) != normalize_factory(held.factory):
        raise IndexMismatchError(
            held.name,
            {**identity, "factory": held.factory},
            {"factory": normalize_factory(factory)},
            location=location,
            reason=(
                "The FAISS index type is fixed when an index is created; rebuilding it as "
                "another type means re-indexing."
            ),
        )


def embedder_description(info: ManifestInfo) -> dict[str, Any] | None:
    """``info.embedder_description`` (a function, for callers holding only the manifest)."""
    return info.embedder_description


def normalize_description(described: dict[str, Any]) -> dict[str, Any]:
    """``describe()`` as stored: JSON values (tuples become lists, odd objects strings)."""
    return json.loads(json.dumps(dict(described), sort_keys=True, default=str))


def check_embedder_description(held: ManifestInfo, described: dict[str, Any]) -> None:
    """Raise :class:`EmbedderMismatchError` when ``described`` differs from the recorded
    description in an option that shapes the vectors; nothing recorded accepts anything."""
    recorded = held.embedder_description
    if recorded is None:
        return
    asked = normalize_description(described)
    differing = {
        k: (recorded.get(k), asked.get(k))
        for k in sorted(recorded.keys() | asked.keys())
        if k not in SPEED_ONLY and recorded.get(k) != asked.get(k)
    }
    if differing:
        raise EmbedderMismatchError(held.name, held.embedder, differing)


def check_embedder_options(held: ManifestInfo, options: dict[str, Any]) -> None:
    """Raise :class:`EmbedderMismatchError` when an option a run asks for (``-E key=value``)
    differs from the index's recorded value; options the index did not record pass.

    A partial check, before any model loads: a run with nothing new to embed never builds the
    embedder whose full description :func:`check_embedder_description` compares.
    """
    recorded = held.embedder_description
    if recorded is None:
        return
    asked = normalize_description(options)
    differing = {
        k: (recorded[k], v)
        for k, v in sorted(asked.items())
        if k in recorded and k not in SPEED_ONLY and _differs(recorded[k], v)
    }
    if differing:
        raise EmbedderMismatchError(held.name, held.embedder, differing)


def _differs(recorded: Any, asked: Any) -> bool:
    """Numbers compare by value (``steps=5.0`` asks for the recorded 5), the rest exactly."""
    numbers = (int, float)
    if isinstance(recorded, numbers) and isinstance(asked, numbers):
        return float(recorded) != float(asked)
    return recorded != asked


def write_manifest_json(directory: str | os.PathLike[str], info: ManifestInfo) -> Path:
    """Write ``manifest.json`` atomically (tmp + fsync + replace)."""
    path = Path(directory) / MANIFEST_JSON
    tmp = path.with_name(path.name + ".tmp")
    data = json.dumps(info.to_json(), indent=2, sort_keys=False, default=str) + "\n"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def read_manifest_json(directory: str | os.PathLike[str]) -> ManifestInfo | None:
    """The human copy of the manifest, or None if the directory has none or it is unreadable.

    The database holds the manifest; this copy only saves opening it. A damaged copy (a bad
    edit, a truncated write) is skipped with a warning and rewritten by the next writer.
    """
    path = Path(directory) / MANIFEST_JSON
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        known = {f for f in ManifestInfo.__dataclass_fields__}
        return ManifestInfo(**{k: v for k, v in data.items() if k in known})
    except (ValueError, TypeError, AttributeError) as exc:  # JSON, wrong fields, not an object
        LOG.warning(
            "skipping the unreadable manifest copy %s (%s): the database's is used", path, exc
        )
        return None
