"""``POST /api/search/by-image``: a photo and a mask (or box) as the query; nothing stored."""

from __future__ import annotations

import time

import numpy as np
from fastapi import APIRouter, HTTPException, Request, status

from regionsearch.api.convert import hit_out
from regionsearch.api.deps import ApiKeyDep, SameOriginDep, SearcherDep, StateDep
from regionsearch.api.example_form import form_body, index_embedder, read_example_form
from regionsearch.api.query_params import HitOptionsDep
from regionsearch.api.schemas import ByImageOut, QueryRegionOut, RLEOut
from regionsearch.masks import rle as rle_mod

router = APIRouter(prefix="/api/search", tags=["search"])

ERRORS = {
    401: {"description": "missing or wrong X-API-Key (when the server has one)"},
    403: {"description": "cross-origin request"},
    413: {"description": "file or image over the server's limits"},
    415: {"description": "not an image the server reads"},
    422: {"description": "bad field: the message names it"},
}


@router.post(
    "/by-image",
    response_model=ByImageOut,
    openapi_extra=form_body("At most one of mask, rle, box; none: the whole photo."),
    responses=ERRORS,
)
async def search_by_image(
    request: Request,
    state: StateDep,
    searcher: SearcherDep,
    _origin: SameOriginDep,
    _key: ApiKeyDep,
    hits_wanted: HitOptionsDep,
) -> ByImageOut:
    """Indexed regions most like a region of a photo that is sent, not stored.

    The mask (a PNG, a COCO RLE or a box; the whole photo when none) is embedded with the
    index's own embedder and the options its manifest records, then searched like a stored
    region in ``/api/regions/{id}/similar``. Same upload limits and key rules as
    ``POST /api/images``.
    """
    from starlette.concurrency import run_in_threadpool

    from regionsearch.search.examples import search_by_example

    t0 = time.perf_counter()
    form = await read_example_form(request, state)
    if len(form.masks) > 1:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            f"send at most one mask, rle or box (got {len(form.masks)})",
        )
    mask = form.masks[0] if form.masks else np.ones(form.hw, dtype=bool)

    def work() -> list:
        embedder = index_embedder(state)
        with state.embed_lock:
            return search_by_example(
                searcher,
                embedder,
                form.pixels,
                mask,
                **hits_wanted.kwargs(),
            )

    hits = await run_in_threadpool(work)
    rle = rle_mod.encode(mask)
    return ByImageOut(
        query=QueryRegionOut(
            width=form.hw[1],
            height=form.hw[0],
            bbox=[float(v) for v in rle_mod.bbox(rle)],
            area=float(mask.sum()),
            rle=RLEOut(size=list(rle["size"]), counts=rle["counts"]),
            mask_from=form.kinds[0] if form.kinds else "image",
        ),
        k=hits_wanted.k,
        min_score=hits_wanted.min_score,
        count=len(hits),
        took_ms=(time.perf_counter() - t0) * 1000,
        results=[hit_out(h, searcher.index) for h in hits],
    )
