"""Storage of a region index: SQL metadata (SQLAlchemy + Alembic) and a vector backend.

The storage layer knows nothing about models beyond the name, embedder and dimension recorded in
each index's manifest. Entry point: :class:`RegionIndex` (a facade: ``store/index.py`` lists the
modules behind it; ``store/consistency.py`` documents the SQL/vector protocol). Vectors are
reached only through :class:`VectorBackend` (``store/backend.py``), opened by
:func:`open_vector_backend`; :class:`VectorStore` is the FAISS one.
"""

from .backend import ReadOnlyBackendError, RegionFilter, VectorBackend
from .backends import open_vector_backend
from .db import Database, SchemaTooNewError, migrations_dir, open_database
from .errors import IndexDatabaseError, IndexLockedError, IndexNotFoundError, ReadOnlyIndexError
from .index import RegionIndex
from .manifest import IndexMismatchError, ManifestInfo
from .models import REGION_SOURCES, ImageStatus, VectorState
from .records import ImageRecord, IndexStats, NewRegion, ReconcileReport, RegionRecord
from .region_filters import ImageFilter
from .vectors import (
    DEFAULT_FACTORY,
    ReadOnlyError,
    VectorStore,
    VectorStoreError,
    VectorValidationError,
)

__all__ = [
    "DEFAULT_FACTORY",
    "REGION_SOURCES",
    "Database",
    "ImageFilter",
    "ImageRecord",
    "ImageStatus",
    "IndexDatabaseError",
    "IndexLockedError",
    "IndexMismatchError",
    "IndexNotFoundError",
    "IndexStats",
    "ManifestInfo",
    "NewRegion",
    "ReadOnlyBackendError",
    "ReadOnlyError",
    "ReadOnlyIndexError",
    "ReconcileReport",
    "RegionFilter",
    "RegionIndex",
    "RegionRecord",
    "SchemaTooNewError",
    "VectorBackend",
    "VectorState",
    "VectorStore",
    "VectorStoreError",
    "VectorValidationError",
    "migrations_dir",
    "open_database",
    "open_vector_backend",
]
