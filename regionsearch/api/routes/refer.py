"""``POST /api/refer``: a referring expression on a photo that is sent, not stored."""

from __future__ import annotations

import base64
import io
import time

import numpy as np
from fastapi import APIRouter, HTTPException, Request, status
from PIL import Image

from regionsearch.api.deps import ApiKeyDep, SameOriginDep, StateDep
from regionsearch.api.example_form import form_body, index_embedder, read_example_form
from regionsearch.api.query_params import Expression, MaskPng, ReferK
from regionsearch.api.routes.by_image import ERRORS
from regionsearch.api.schemas import ReferImageOut, ReferredRegionOut, RLEOut

router = APIRouter(prefix="/api", tags=["search"])


def png_data_url(mask: np.ndarray) -> str:
    """A bool mask as a white-on-black PNG data URL (``<img src=...>`` shows it as is)."""
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


@router.post(
    "/refer",
    response_model=ReferImageOut,
    openapi_extra=form_body("Any number; none: automatic proposals of the photo."),
    responses=ERRORS,
)
async def refer_image(
    request: Request,
    state: StateDep,
    _origin: SameOriginDep,
    _key: ApiKeyDep,
    q: Expression,
    k: ReferK = 5,
    mask_png: MaskPng = False,
) -> ReferImageOut:
    """The region of a sent photo best matching the referring expression ``q``, with
    alternatives. Nothing is stored.

    Candidates are the masks sent (``mask``, ``rle``, ``box`` fields, in that order), else the
    photo's automatic proposals (as an upload would get). They are embedded with the index's
    own embedder and options and ranked as ``GET /api/refer`` ranks an indexed photo's regions:
    the same photo once indexed with the same masks gives the same answer. Same upload limits
    and key rules as ``POST /api/images``.
    """
    from starlette.concurrency import run_in_threadpool

    from regionsearch.search.examples import ImageReferResult
    from regionsearch.search.examples import refer_image as refer_on

    if not q.strip():
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "q is blank")
    t0 = time.perf_counter()
    form = await read_example_form(request, state)
    searcher = state.searcher

    def work() -> ImageReferResult:
        query = searcher.encode_query(q, templated=False)
        embedder = index_embedder(state)
        masks = np.stack(form.masks) if form.masks else None
        with state.embed_lock:
            return refer_on(embedder, form.pixels, query, masks, k=k)

    result = await run_in_threadpool(work)
    regions = [
        ReferredRegionOut(
            candidate=r.candidate,
            bbox=list(r.bbox),
            area=r.area,
            score=r.score,
            source=r.source,
            rle=RLEOut(size=list(r.rle["size"]), counts=r.rle["counts"]),
            mask_png=png_data_url(r.mask()) if mask_png else None,
        )
        for r in result.regions
    ]
    return ReferImageOut(
        expression=q,
        width=result.width,
        height=result.height,
        candidates=result.candidates,
        candidates_from=result.source,
        best=regions[0] if regions else None,
        alternatives=regions[1:],
        took_ms=(time.perf_counter() - t0) * 1000,
    )
