"""Pictures the server has already made: decoded photos and encoded JPEGs, in a bounded LRU.

A page of results asks for many pictures of few photos (several regions of one photo, the
same photo again on the next search), and decoding and resizing a photo costs more than
everything else of an overlay. Entries are keyed by everything that determines them (the
photo file's path, size and modification time, the requested size, the region), so a changed
file is never served from the cache; the same key gives browsers an ``ETag``, so a page
shown again costs a ``304``.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from fastapi import Response

T = TypeVar("T", bytes, np.ndarray)

#: Browsers may reuse a picture this long without asking; after that, they revalidate (ETag).
MAX_AGE_S = 600


def file_key(path: Path) -> tuple[str, int, int]:
    """``(path, size, mtime_ns)`` of a photo file: part of every key made from it
    (``OSError`` when it is gone)."""
    st = os.stat(path)
    return (str(path), st.st_size, st.st_mtime_ns)


def etag(key: Hashable) -> str:
    """A strong ETag for the picture made from ``key``."""
    return '"' + hashlib.blake2b(repr(key).encode(), digest_size=12).hexdigest() + '"'


class PictureCache:
    """A thread-safe LRU of pictures (encoded ``bytes`` or decoded arrays), bounded in bytes.

    :meth:`get` computes a missing entry outside the lock, so a slow decode never blocks
    other requests; two requests missing the same key at once may both compute it.
    """

    def __init__(self, max_bytes: int = 128 * 2**20) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def _size(value: bytes | np.ndarray) -> int:
        return value.nbytes if isinstance(value, np.ndarray) else len(value)

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Hashable, make: Callable[[], T]) -> T:
        """The cached value of ``key``, or ``make()`` (then cached). Arrays come back
        read-only: callers share them."""
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key]
            self.misses += 1
        value = make()
        if isinstance(value, np.ndarray):
            value.flags.writeable = False
        size = self._size(value)
        if size > self.max_bytes:
            return value
        with self._lock:
            if key not in self._items:
                self._items[key] = value
                self._bytes += size
            while self._bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self._bytes -= self._size(old)
        return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0


def _matches(if_none_match: str | None, tag: str) -> bool:
    """Whether an ``If-None-Match`` header names ``tag`` (weak or strong) or is ``*``."""
    if not if_none_match:
        return False
    tags = [t.strip().removeprefix("W/") for t in if_none_match.split(",")]
    return tag in tags or "*" in tags


def picture_response(
    if_none_match: str | None,
    cache: PictureCache,
    key: Hashable,
    make: Callable[[], bytes],
    media_type: str,
) -> Response:
    """The picture of ``key`` (from ``cache`` or made), or ``304`` when the browser has it."""
    tag = etag(key)
    headers = {"ETag": tag, "Cache-Control": f"max-age={MAX_AGE_S}"}
    if _matches(if_none_match, tag):
        return Response(status_code=304, headers=headers)
    return Response(cache.get(key, make), media_type=media_type, headers=headers)
