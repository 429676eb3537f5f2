"""A :class:`RegionFilter` as Milvus boolean expressions, bounded in size.

Milvus filters inside the engine with an expression string. How a filter is written matters
(measured on Milvus Lite 3.2.2, 20k vectors, d=64, median of 5, shared 2-core AMD EPYC; an
unfiltered search took 17-25 ms):

- ``image_id in [...]`` costs about the same for 1 and 1,000 images (10-20 ms): one set
  membership test over a scalar column (with an INVERTED index on servers);
- ``(id >= a and id < b) or ...`` grows by about 0.1 ms per range (1,000 ranges: 124 ms), but
  one or a few ranges are the cheapest form and on a server let the primary-key statistics
  skip whole segments;
- ``id in [...]`` grows with the list (20,000 ids: 92 ms).

So: ranges are merged first (the images of one folder, indexed together, have adjacent id
blocks and collapse into one range); up to :data:`RANGE_TERMS` merged ranges are written as
ranges, more as ``image_id in [...]`` when the filter names its images and every stored row
has its image id, else as ranges. Extra single ids become ``id in [...]``.

Expressions stay bounded: at most :data:`MAX_TERMS` values per expression (a range counts as
:data:`RANGE_COST` values, its measured cost relative to a listed id). A larger filter becomes
several expressions whose union is the filter; the backend searches each and merges the top-k
(exact: the best k of a union are among the best k of its parts).
"""

from __future__ import annotations

import numpy as np

from .backend import RegionFilter
from .filter_ops import merged_ranges

#: Merged ranges up to which a filter is written as ``id`` ranges rather than image ids.
RANGE_TERMS = 4
#: Most values (listed ids or image ids; a range counts RANGE_COST) in one expression.
MAX_TERMS = 4096
#: What one ``id`` range costs, in listed values (1,000 ranges ~ 25,000 listed ids).
RANGE_COST = 25


def _range(start: int, stop: int) -> str:
    return f"(id == {start})" if stop - start == 1 else f"(id >= {start} and id < {stop})"


def _in_list(field: str, values: np.ndarray) -> str:
    return f"({field} in [{','.join(map(str, values.tolist()))}])"


def filter_expressions(
    selector: RegionFilter,
    *,
    image_field_usable: bool,
    max_terms: int = MAX_TERMS,
    range_terms: int = RANGE_TERMS,
) -> list[str]:
    """Expressions whose union allows exactly what ``selector`` allows (empty: nothing).

    ``image_field_usable``: every stored row carries its image id, so ``selector.image_ids``
    (which names the images the ranges cover) may stand for the ranges.
    """
    ranges = merged_ranges(selector.id_ranges)
    pieces: list[tuple[int, str]] = []  # (cost, expression)
    if len(ranges) > range_terms and image_field_usable and selector.image_ids is not None:
        images = np.unique(np.asarray(selector.image_ids, dtype=np.int64))
        pieces += [(len(c), _in_list("image_id", c)) for c in _split(images, max_terms)]
    else:
        pieces += [(RANGE_COST, _range(int(a), int(b))) for a, b in ranges]
    if selector.ids is not None and len(selector.ids):
        extra = np.unique(np.asarray(selector.ids, dtype=np.int64))
        plain = RegionFilter(id_ranges=ranges)
        extra = extra[~plain.allows(extra)]  # ids the ranges already allow add nothing
        pieces += [(len(c), _in_list("id", c)) for c in _split(extra, max_terms)]
    return _pack(pieces, max_terms)


def _split(values: np.ndarray, size: int) -> list[np.ndarray]:
    return [values[i : i + size] for i in range(0, len(values), size)] if len(values) else []


def _pack(pieces: list[tuple[int, str]], budget: int) -> list[str]:
    """OR pieces together in order, starting a new expression when ``budget`` would be passed."""
    out: list[str] = []
    current: list[str] = []
    cost = 0
    for piece_cost, expr in pieces:
        if current and cost + piece_cost > budget:
            out.append(" or ".join(current))
            current, cost = [], 0
        current.append(expr)
        cost += piece_cost
    if current:
        out.append(" or ".join(current))
    return out
