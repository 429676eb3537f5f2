"""``GET /api/regions/{id}/similar``: "more like this" with a stored region's own vector."""

from __future__ import annotations

import time

from fastapi import APIRouter

from regionsearch.api.convert import hit_out
from regionsearch.api.deps import RegionDep, SearcherDep
from regionsearch.api.query_params import HitOptionsDep
from regionsearch.api.schemas import SimilarOut

router = APIRouter(prefix="/api/regions", tags=["search"])


@router.get("/{region_id}/similar", response_model=SimilarOut)
def similar(region: RegionDep, searcher: SearcherDep, hits_wanted: HitOptionsDep) -> SimilarOut:
    """Regions most like region ``region_id``, best first, found with its own stored vector.

    Filters and ``min_score`` work as in ``/api/search``. The region itself is never returned;
    its near-duplicates in its own photo are dropped as duplicates of it, and with
    ``one_per_image`` its photo is left out (its best region is the region itself).
    """
    from regionsearch.search.examples import similar as find_similar

    t0 = time.perf_counter()
    hits = find_similar(searcher, region.id, **hits_wanted.kwargs())
    return SimilarOut(
        region_id=region.id,
        k=hits_wanted.k,
        min_score=hits_wanted.min_score,
        count=len(hits),
        took_ms=(time.perf_counter() - t0) * 1000,
        results=[hit_out(h, searcher.index) for h in hits],
    )
