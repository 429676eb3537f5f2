"""Storage of a region index: SQL metadata (SQLAlchemy + Alembic) and FAISS vectors.

The storage layer knows nothing about models beyond the name, embedder and dimension recorded in
each index's manifest. Entry point: :class:`RegionIndex` (``store/index.py`` documents the
SQL/FAISS consistency protocol); :class:`VectorStore` is the FAISS layer on its own.
"""

from .db import Database, SchemaTooNewError, migrations_dir, open_database
from .index import (
    ImageRecord,
    IndexLockedError,
    IndexNotFoundError,
    IndexStats,
    NewRegion,
    ReadOnlyIndexError,
    ReconcileReport,
    RegionIndex,
    RegionRecord,
)
from .manifest import IndexMismatchError, ManifestInfo
from .models import REGION_SOURCES, ImageStatus, VectorState
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
    "ImageRecord",
    "ImageStatus",
    "IndexLockedError",
    "IndexMismatchError",
    "IndexNotFoundError",
    "IndexStats",
    "ManifestInfo",
    "NewRegion",
    "ReadOnlyError",
    "ReadOnlyIndexError",
    "ReconcileReport",
    "RegionIndex",
    "RegionRecord",
    "SchemaTooNewError",
    "VectorState",
    "VectorStore",
    "VectorStoreError",
    "VectorValidationError",
    "migrations_dir",
    "open_database",
]
