"""The query layer: text and referring-expression lookups, filters, thresholds (no HTTP)."""

from regionsearch.search.searcher import (
    SHORT_PHRASE_WORDS,
    ReferResult,
    RegionHit,
    RegionSearcher,
    SearchFilters,
    is_short_phrase,
    resolve_image_path,
)

__all__ = [
    "SHORT_PHRASE_WORDS",
    "ReferResult",
    "RegionHit",
    "RegionSearcher",
    "SearchFilters",
    "is_short_phrase",
    "resolve_image_path",
]
