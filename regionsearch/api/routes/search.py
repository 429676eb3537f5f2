"""``/api/search`` and ``/api/refer``."""

from __future__ import annotations

import dataclasses
import time
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query

from regionsearch.api.convert import hit_out
from regionsearch.api.deps import ImageDep, SearcherDep
from regionsearch.api.query_params import HitOptionsDep
from regionsearch.api.schemas import ReferOut, SearchOut

router = APIRouter(prefix="/api", tags=["search"])

QueryText = Annotated[str, Query(min_length=1, max_length=500, description="text to look for")]
OpenSet = Annotated[
    float | None,
    Query(
        ge=0.0,
        le=10.0,
        description="weight of the open-set term: regions matching generic texts ('background', "
        "'texture', ...) as well as q lose rank; 0 = off; absent = the server's default (on "
        "for indexes of crop-style embedders, Alpha-CLIP and IP-CLIP)",
        examples=[1.0],
    ),
]
Repetition = Annotated[
    float | None,
    Query(
        ge=0.0,
        le=10.0,
        description="weight of the repeated-stuff term: a region alike to several regions of its "
        "photo that it barely touches (tiles of a textured background) loses score; 0 = off; "
        "absent = the server's default (on for indexes of MaskInversion, Alpha-CLIP, IP-CLIP, "
        "crop and masked crop)",
        examples=[0.0],
    ),
]


@router.get("/search", response_model=SearchOut)
def search(
    searcher: SearcherDep,
    q: QueryText,
    hits_wanted: HitOptionsDep,
    open_set: OpenSet = None,
    repetition: Repetition = None,
) -> SearchOut:
    """Regions matching ``q``, best first; ``min_score`` may leave none (a "no match")."""
    if not q.strip():
        raise HTTPException(422, "q is blank")
    t0 = time.perf_counter()
    switches = {"open_set": open_set, "repetition": repetition}
    chosen = {name: weight for name, weight in switches.items() if weight is not None}
    results = dataclasses.replace(searcher.results, **chosen) if chosen else None
    hits = searcher.search(q, **hits_wanted.kwargs(), results=results)
    results = [hit_out(h, searcher.index) for h in hits]
    return SearchOut(
        query=q,
        templated=searcher.templates_for(q.strip()) is not None,
        k=hits_wanted.k,
        min_score=hits_wanted.min_score,
        count=len(results),
        took_ms=(time.perf_counter() - t0) * 1000,
        results=results,
    )


@router.get("/refer", response_model=ReferOut)
def refer(
    searcher: SearcherDep,
    image: ImageDep,
    q: QueryText,
    k: Annotated[int, Query(ge=1, le=100)] = 5,
) -> ReferOut:
    """The region of image ``image_id`` best matching the referring expression ``q``."""
    if not q.strip():
        raise HTTPException(422, "q is blank")
    result = searcher.refer(image.id, q, k=k)
    return ReferOut(
        expression=q,
        image_id=image.id,
        best=hit_out(result.best, searcher.index) if result.best else None,
        alternatives=[hit_out(h, searcher.index) for h in result.alternatives],
    )
