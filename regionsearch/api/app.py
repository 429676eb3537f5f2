"""``create_app(settings)``: the FastAPI app (no import-time globals; state built in lifespan)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request, status
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles

from regionsearch.api.convert import public_text
from regionsearch.api.deps import AppState
from regionsearch.api.docs import add_local_docs
from regionsearch.api.routes import by_image, images, refer, regions, search, similar, system
from regionsearch.api.settings import Settings
from regionsearch.api.threads import compute_threads

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"


def _unique_id(route: APIRoute) -> str:
    return f"{route.tags[0]}-{route.name}" if route.tags else route.name


def open_state(settings: Settings, backbone: Any = None) -> AppState:
    """Open the index read-only (uploads open it writable for their duration only: a running
    server never blocks ``regionsearch index``) and load the model."""
    from regionsearch.search import RegionSearcher
    from regionsearch.store import RegionIndex

    index = RegionIndex.open(
        settings.index_dir,
        read_only=True,
        db_url=settings.db_url,
        vectors_location=settings.vectors,
    )
    try:
        if backbone is None:
            from regionsearch.backbone import load_backbone

            backbone = load_backbone(settings.model or index.model, None, settings.device)
    except BaseException:
        index.close()
        raise
    searcher = RegionSearcher(index, backbone, threads=settings.threads)
    return AppState(settings, index, backbone, searcher)


def _public_detail(request: Request, exc: Exception) -> str:
    """The message of ``exc`` without the server's folders (clients see relative paths only)."""
    state = getattr(request.app.state, "regionsearch", None)
    return public_text(state.index, str(exc)) if state is not None else str(exc)


def create_app(
    settings: Settings, *, backbone: Any = None, state_factory: Callable[..., AppState] = open_state
) -> FastAPI:
    """The app for one index. ``backbone`` skips model loading (tests pass a tiny one)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        with compute_threads(settings.threads):
            state = state_factory(settings, backbone)
            app.state.regionsearch = state
            try:
                yield
            finally:
                app.state.regionsearch = None
                state.index.close()

    app = FastAPI(
        title="regionsearch",
        summary="Find the region of a photo that matches a text.",
        version="0.1",
        lifespan=lifespan,
        generate_unique_id_function=_unique_id,
        docs_url=None,  # served from local files by add_local_docs (no CDN)
        redoc_url=None,
    )
    add_local_docs(app)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],  # writes also pass the same-origin check
            allow_headers=["X-API-Key", "Content-Type"],
        )
    for module in (search, by_image, refer, regions, similar, images, system):
        app.include_router(module.router)

    @app.exception_handler(ValueError)
    async def _value_error(request: Request, exc: ValueError) -> JSONResponse:
        return JSONResponse({"detail": _public_detail(request, exc)}, status_code=422)

    @app.exception_handler(KeyError)
    async def _key_error(request: Request, exc: KeyError) -> JSONResponse:
        return JSONResponse(
            {"detail": _public_detail(request, exc)}, status_code=status.HTTP_404_NOT_FOUND
        )

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    def index_page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    return app
