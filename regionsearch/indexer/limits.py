"""Limits of the indexer that the command line shows in ``--help`` (kept import-light)."""

from __future__ import annotations

#: Default bound on decoded pixels: twice Pillow's own decompression-bomb threshold (178 MP,
#: about 0.5 GB of RGB). Photos above it are refused unless ``max_side`` lets a JPEG decode at a
#: reduced scale below it; raise it with ``--max-pixels``.
DEFAULT_MAX_PIXELS = 2 * 89_478_485
