"""Detection-style scoring of one query's ranking, with pycocotools' matching rule.

Kept apart from :mod:`regionsearch.eval.search_task` (which builds the rankings) so that the rule
can be read, tested and reused (``benchmarks/search_diagnosis.py``) on its own. The rule is
``COCOeval.evaluateImg``'s: walking the ranking best first, a region is a hit when its mask IoU
with a not-yet-matched object of the queried class is at least ``iou`` (it takes the free object
it overlaps most); a region overlapping only already-matched objects is a false positive.
AP is the non-interpolated area under the precision/recall curve over *all* objects of the
class, so objects no region finds count as missed.
"""

from __future__ import annotations

import numpy as np


def match_ranking(
    ranking: np.ndarray,
    image_of: np.ndarray,
    overlap: np.ndarray,
    is_class: np.ndarray,
    iou: float = 0.5,
) -> np.ndarray:
    """Whether each ranked region is a hit, with pycocotools' matching rule (module docstring).

    Args:
        ranking: region indices, best first (regions not listed were not returned).
        image_of: ``(R,)`` image of each region.
        overlap: ``(R, G)`` IoU of each region with each object of its own image.
        is_class: ``(R, G)`` whether that object has the queried class.
        iou: match threshold (IoU >= ``iou`` matches, as in ``COCOeval``).
    """
    ranking = np.asarray(ranking, dtype=np.int64)
    relevant = is_class & (overlap >= iou)
    found: set[tuple[int, int]] = set()
    hits = np.zeros(len(ranking), dtype=bool)
    for position, region in enumerate(ranking.tolist()):
        candidates = np.flatnonzero(relevant[region])
        if not candidates.size:
            continue
        image = int(image_of[region])
        free = [g for g in candidates.tolist() if (image, g) not in found]
        if free:
            found.add((image, max(free, key=lambda g: overlap[region, g])))
            hits[position] = True
    return hits


def detection_metrics(
    ranking: np.ndarray,
    image_of: np.ndarray,
    overlap: np.ndarray,
    is_class: np.ndarray,
    objects: int,
    iou: float = 0.5,
) -> tuple[float, float, bool]:
    """(AP, precision@10, top-1 hit) of one query's ranking (see the module docstring);
    arguments as :func:`match_ranking`, ``objects`` = how many objects of the queried class
    the collection holds."""
    ranks = np.flatnonzero(match_ranking(ranking, image_of, overlap, is_class, iou))
    ap = float((np.arange(1, len(ranks) + 1) / (ranks + 1)).sum() / max(objects, 1))
    return ap, float((ranks < 10).sum() / 10), bool((ranks == 0).any())
