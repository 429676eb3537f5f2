"""``GET /api/regions/{id}/similar``: "more like this" with a stored region's own vector."""

from __future__ import annotations

import time

from fastapi import APIRouter

from regionsearch.api.convert import hit_out
from regionsearch.api.deps import RegionDep, SearcherDep, SettingsDep
from regionsearch.api.query_params import K, MinScore, OnePerImage, PathGlob, check_k
from regionsearch.api.schemas import SimilarOut
from regionsearch.search import SearchFilters

router = APIRouter(prefix="/api/regions", tags=["search"])


@router.get("/{region_id}/similar", response_model=SimilarOut)
def similar(
    region: RegionDep,
    searcher: SearcherDep,
    settings: SettingsDep,
    k: K = 10,
    min_score: MinScore = None,
    path: PathGlob = None,
    one_per_image: OnePerImage = False,
) -> SimilarOut:
    """Regions most like region ``region_id``, best first, found with its own stored vector.

    Filters and ``min_score`` work as in ``/api/search``. The region itself is never returned;
    its near-duplicates in its own photo are dropped as duplicates of it, and with
    ``one_per_image`` its photo is left out (its best region is the region itself).
    """
    from regionsearch.search.examples import similar as find_similar

    check_k(k, settings.max_k)
    t0 = time.perf_counter()
    hits = find_similar(
        searcher,
        region.id,
        k=k,
        min_score=min_score,
        filters=SearchFilters(path_glob=path or None),
        one_per_image=one_per_image,
    )
    return SimilarOut(
        region_id=region.id,
        k=k,
        min_score=min_score,
        count=len(hits),
        took_ms=(time.perf_counter() - t0) * 1000,
        results=[hit_out(h, searcher.index) for h in hits],
    )
