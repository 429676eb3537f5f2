"""Which :class:`~regionsearch.store.backend.VectorBackend` serves a vector location.

A location is a string: a FAISS file path (``indexes/x/vectors.faiss``), a Milvus URL
(``milvus://host:19530/collection``), a Milvus Lite file (``*.db``), a segments directory...
:data:`SCHEMES` maps each form to the function that opens it; the first scheme whose
``matches`` accepts the location wins, and a plain path that no scheme claims is a FAISS file.
Openers are named as ``"module:function"`` and imported only when used, so a backend's
dependencies (pymilvus) load only for indexes that use it.

Adding an engine is one line in :data:`SCHEMES` plus an opener with the signature of
:func:`open_faiss_file`.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from regionsearch.errors import RegionSearchError

from .backend import DimensionMismatchError, VectorBackend

#: An opener: ``(location, *, dimension, factory, read_only, create, use_gpu, **options)``.
Opener = Callable[..., VectorBackend]


@dataclass(frozen=True)
class Scheme:
    """One form of location and the ``"module:function"`` that opens it."""

    name: str
    matches: Callable[[str], bool]
    opener: str

    def load(self) -> Opener:
        module, _, func = self.opener.partition(":")
        return getattr(importlib.import_module(module), func)


def url_scheme(*prefixes: str) -> Callable[[str], bool]:
    """A matcher for locations starting with one of ``prefixes`` (``"milvus://"``)."""
    return lambda location: location.startswith(prefixes)


def suffix(*suffixes: str) -> Callable[[str], bool]:
    """A matcher for paths ending with one of ``suffixes`` (``".db"``)."""
    return lambda location: "://" not in location and location.endswith(suffixes)


#: Location forms, tried in order; a plain path no scheme claims falls through to FAISS.
SCHEMES: tuple[Scheme, ...] = (
    Scheme("faiss", suffix(".faiss"), "regionsearch.store.backends:open_faiss_file"),
    Scheme("faiss-segments", suffix(".segments"), "regionsearch.store.segments:open_segments"),
    Scheme(
        "milvus",
        url_scheme("milvus://", "milvus+http://", "milvus+https://"),
        "regionsearch.store.milvus:open_milvus",
    ),
    Scheme("milvus-lite", url_scheme("milvus-lite://"), "regionsearch.store.milvus:open_milvus"),
    Scheme("milvus-lite", suffix(".db"), "regionsearch.store.milvus:open_milvus"),
)

FALLBACK = Scheme("faiss", lambda _location: True, "regionsearch.store.backends:open_faiss_file")


#: The vector location of an index directory when none is given (``RegionIndex.open``).
DEFAULT_FILE = "vectors.faiss"


#: Where a new index keeps its vectors: append-only segments (see store/segments.py).
SEGMENTS_DIR = "vectors.segments"
EXACT_FACTORIES = ("", "Flat", "IDMap,Flat", "IDMap2,Flat")


def default_location(directory: str | os.PathLike[str], factory: str | None = None) -> str:
    """Where an index directory keeps its vectors unless told otherwise.

    An index that already has its single FAISS file (made before segments existed) keeps it:
    it opens as it is, never converted. So does an index built with an explicit ANN
    ``factory`` (one trained file). Every other index gets a segment directory, whose
    segments pick their own structure by size (store/ann_policy.py).
    """
    legacy = Path(directory) / DEFAULT_FILE
    exact = factory is None or factory.replace(" ", "") in EXACT_FACTORIES
    if legacy.exists() or not exact:
        return str(legacy)
    return str(Path(directory) / SEGMENTS_DIR)


class UnknownVectorLocationError(RegionSearchError, ValueError):
    """A vector location with a URL scheme no backend registers."""


def scheme_for(location: str | os.PathLike[str]) -> Scheme:
    """The scheme that serves ``location`` (see :data:`SCHEMES`)."""
    loc = os.fspath(location)
    for scheme in SCHEMES:
        if scheme.matches(loc):
            return scheme
    if "://" in loc:
        known = ", ".join(sorted({s.name for s in SCHEMES}))
        raise UnknownVectorLocationError(
            f"no vector backend handles {loc.split('://', 1)[0]}:// locations (known: {known})"
        )
    return FALLBACK


def open_vector_backend(
    location: str | os.PathLike[str],
    *,
    dimension: int,
    factory: str | None,
    read_only: bool,
    create: bool,
    use_gpu: bool | None = None,
    **options: Any,
) -> VectorBackend:
    """Open the vector engine at ``location`` (creating an empty one there if ``create``).

    ``factory`` is the engine's index description (a FAISS factory string; ``None``: what the
    location records, else the engine's default). A read-only backend never writes; created
    read-only, it is empty until ``refresh()`` finds a writer's first commit. ``options`` go
    to the engine (FAISS: ``train_size``, ``nprobe``, ``mmap``...).
    """
    opener = scheme_for(location).load()
    return opener(
        os.fspath(location),
        dimension=dimension,
        factory=factory,
        read_only=read_only,
        create=create,
        use_gpu=use_gpu,
        **options,
    )


def open_faiss_file(
    location: str,
    *,
    dimension: int,
    factory: str | None,
    read_only: bool,
    create: bool,
    use_gpu: bool | None = None,
    **options: Any,
) -> VectorBackend:
    """A :class:`~regionsearch.store.vectors.VectorStore` bound to the FAISS file ``location``."""
    from .vectors import DEFAULT_FACTORY, VectorStore

    path = Path(location)
    if path.exists():
        store = VectorStore.open(
            path, factory=factory, read_only=read_only, use_gpu=use_gpu, **options
        )
        if store.dimension != int(dimension):
            raise DimensionMismatchError(
                f"{path} holds {store.dimension}-d vectors, not {int(dimension)}-d"
            )
        return store
    if not create:
        raise FileNotFoundError(f"no vector index at {path}")
    return VectorStore(
        int(dimension),
        factory or DEFAULT_FACTORY,
        use_gpu=use_gpu,
        path=path,
        read_only=read_only,
        **options,
    )


__all__ = [
    "DEFAULT_FILE",
    "SCHEMES",
    "SEGMENTS_DIR",
    "Scheme",
    "UnknownVectorLocationError",
    "default_location",
    "open_faiss_file",
    "open_vector_backend",
    "scheme_for",
    "suffix",
    "url_scheme",
]
