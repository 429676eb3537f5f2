"""Image filters as SQL, and the :class:`RegionFilter` a vector backend applies in bulk.

A search restricted to some images (a path glob, a folder, explicit image ids) must not build
Python lists of region ids (14.5 s for a filter matching every image of 1M regions), nor
aggregate the regions table (``GROUP BY image_id``: ~30 us per image, 3 s for half the images
of 10M regions). Each image row carries the span of its live region ids (``region_id_start``,
``region_id_end``, ``live_regions``: written with the regions, see
:mod:`regionsearch.store.regions`), so a filter is one scan of ``images`` ::

    SELECT id, region_id_start, region_id_end, live_regions FROM images
    WHERE <path / folder / id conditions> AND live_regions > 0

(read back as one comma-joined string per column: see :func:`_spans`). The span is the image's
half-open range whenever ``live_regions == end - start`` (the regions of one image get
contiguous ids). Ranges are then merged in numpy: the images of a
folder, indexed together, collapse into one range. An image whose live ids are not contiguous
(regions added without ``replace``) falls back to its explicit ids.

Glob semantics follow :mod:`fnmatch` (``*`` also crosses ``/``): ``GLOB`` on SQLite, an
anchored regex on PostgreSQL. A folder matches everything below it, case-sensitively
(``LIKE 'folder/%'``; on SQLite the equivalent range of paths, which uses the path index).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import Connection, String, cast, func, select

from . import sql
from .backend import RegionFilter
from .filter_ops import merged_ranges
from .models import Image
from .regions import live_ids_of_images
from .sql import in_list


@dataclass(frozen=True)
class ImageFilter:
    """Which images a search may return; every given condition must hold (AND).

    Paths are as the index stores them (relative to its image root when it has one).
    """

    path_glob: str | None = None
    folder: str | None = None
    image_ids: Sequence[int] | None = None

    def active(self) -> bool:
        return bool(self.path_glob or self.folder or self.image_ids is not None)


def glob_to_regex(pattern: str) -> str:
    """An anchored POSIX regex with :mod:`fnmatch` semantics (``*`` also crosses ``/``).

    Written out here rather than taken from ``fnmatch.translate``, whose output uses Python-only
    syntax (atomic groups for patterns with several ``*``) that PostgreSQL rejects."""
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        i += 1
        if c == "*":
            out.append(".*")
        elif c == "?":
            out.append(".")
        elif c == "[":
            j = i + 1 if i < n and pattern[i] == "!" else i
            j = j + 1 if j < n and pattern[j] == "]" else j
            while j < n and pattern[j] != "]":
                j += 1
            if j >= n:  # no closing bracket: a literal '['
                out.append("\\[")
                continue
            body = pattern[i:j].replace("\\", "\\\\")
            i = j + 1
            if body.startswith("!"):
                body = "^" + body[1:]
            elif body.startswith("^"):
                body = "\\" + body
            out.append("[" + body + "]")
        else:
            out.append(re.escape(c))
    return "^" + "".join(out) + "$"


def path_conditions(f: ImageFilter, dialect: str) -> list[Any]:
    """``WHERE`` clauses on ``images.path`` for the glob and folder of ``f``."""
    conds: list[Any] = []
    if f.path_glob:
        if dialect == "sqlite":
            conds.append(Image.path.op("GLOB")(f.path_glob))
        else:
            conds.append(Image.path.regexp_match(glob_to_regex(f.path_glob)))
    if f.folder:
        folder = f.folder.rstrip("/")
        if dialect == "sqlite":
            # 'folder/' <= path < 'folder0' ('0' follows '/'): exactly the paths under it in
            # SQLite's byte order, searched in the path index, and case-sensitive like
            # PostgreSQL's LIKE (SQLite's LIKE ignores ASCII case and cannot use the index)
            conds += [Image.path >= folder + "/", Image.path < folder + "0"]
        else:
            escaped = folder.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            conds.append(Image.path.like(escaped + "/%", escape="\\"))
    return conds


#: What a filter reads of each matching image row (migration 0003).
_SPAN_COLUMNS = (Image.id, Image.region_id_start, Image.region_id_end, Image.live_regions)


def _spans(conn: Connection, conds: list[Any]) -> np.ndarray:
    """``(n, 4)`` int64 rows ``image_id, start, end, live`` of the images matching ``conds``.

    One row comes back: ``count(*)`` and, per column, the values joined by commas
    (``group_concat`` on SQLite, ``string_agg`` elsewhere), parsed in C by ``np.fromstring``.
    Fetching ``n`` rows instead builds a Python tuple of 4 ints per image: for 100k of 200k
    images (SQLite, shared 2-core EPYC, CPU time) ~70 ms with the raw driver and ~240 ms through
    ``Result.fetchall``, against ~50 ms here, ~15-30 ms of which is the scan itself. One aggregation pass feeds every aggregate the same
    rows in the same order, so the i-th value of each string belongs to the same image.
    """
    as_text = conn.dialect.name != "sqlite"  # SQLite's group_concat takes integers as they are
    aggs = [func.aggregate_strings(cast(c, String) if as_text else c, ",") for c in _SPAN_COLUMNS]
    n, *texts = conn.execute(select(func.count(), *aggs).where(*conds)).one()
    if not n:
        return np.empty((0, 4), np.int64)
    cols = [np.fromstring(t, dtype=np.int64, sep=",") for t in texts]
    if any(c.size != n for c in cols):  # cannot happen unless the columns hold non-integers
        raise RuntimeError(
            f"image spans: expected {n} values per column, read {[c.size for c in cols]}"
        )
    return np.stack(cols, axis=1)


def region_filter(
    conn: Connection, f: ImageFilter, dialect: str, *, among: Sequence[int] | None = None
) -> RegionFilter:
    """The live regions of the images ``f`` allows: merged id ranges (+ ids where an image's
    live ids are not contiguous), read from the image rows alone.

    ``among`` limits the read to these image ids (a sample, or the images of a few search
    candidates: :mod:`regionsearch.store.filter_strategy`), with the very same SQL conditions,
    so a post-filter and an estimate judge paths exactly as the full filter does."""
    conds = [*path_conditions(f, dialect), Image.live_regions > 0]
    wanted = None
    if f.image_ids is not None:
        wanted = np.unique(np.asarray(list(f.image_ids), dtype=np.int64))
    if among is not None:
        limit = np.unique(np.asarray(list(among), dtype=np.int64))
        wanted = limit if wanted is None else np.intersect1d(wanted, limit, assume_unique=True)
    if wanted is None:
        spans = _spans(conn, conds)
    else:
        if wanted.size <= sql.SQL_CHUNK:
            spans = _spans(conn, [*conds, in_list(Image.id, wanted.tolist())])
        else:  # a long list costs more to render as SQL than to test in numpy
            bounds = Image.id.between(int(wanted[0]), int(wanted[-1]))
            spans = _spans(conn, [*conds, bounds])
            spans = spans[np.isin(spans[:, 0], wanted)]
    if len(spans) > 1 and not bool((spans[1:, 0] > spans[:-1, 0]).all()):
        spans = spans[np.argsort(spans[:, 0])]  # image_ids sorted (a table scan usually is)
    image_ids, start, end, live = spans.T
    exact = live == end - start
    ranges = merged_ranges(np.stack([start[exact], end[exact]], axis=1))
    ids = None
    if not exact.all():
        scattered = image_ids[~exact].tolist()
        ids = np.unique(np.asarray(live_ids_of_images(conn, scattered), dtype=np.int64))
    return RegionFilter(id_ranges=ranges, image_ids=image_ids.copy(), ids=ids)
