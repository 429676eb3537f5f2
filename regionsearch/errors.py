"""Exceptions users can act on: each message says what went wrong and what to do instead."""

from __future__ import annotations


class RegionSearchError(Exception):
    """Base class for errors that the CLI prints as one sentence, without a stack trace."""


class BackboneLoadError(RegionSearchError):
    """A model could not be built or its weights could not be found."""


class UnsupportedModelError(BackboneLoadError):
    """The model loads, but its architecture is not one the region embedders can drive."""


class InvalidMaskError(RegionSearchError, ValueError):
    """Masks given to an embedder are empty, mis-sized or of the wrong type."""


class InvalidImageError(RegionSearchError, ValueError):
    """An image could not be decoded or has an unusable shape."""


class QueryError(RegionSearchError, ValueError):
    """A query that cannot run as given: an empty text, fewer than one result asked for."""
