"""Errors a :class:`~regionsearch.store.index.RegionIndex` raises to its callers."""

from __future__ import annotations

from regionsearch.errors import RegionSearchError


class IndexNotFoundError(RegionSearchError, FileNotFoundError):
    """No index at the given directory / database."""


class IndexLockedError(RegionSearchError, RuntimeError):
    """Another process holds this index open for writing."""


class ReadOnlyIndexError(RegionSearchError, RuntimeError):
    """A write was attempted on an index opened with ``read_only=True``."""


class IndexDatabaseError(RegionSearchError, RuntimeError):
    """The index's SQL database cannot be opened or read (a damaged file, a server refusing)."""
