"""``/docs`` (Swagger UI) and ``/redoc`` served from files installed with the package.

FastAPI's defaults load the viewers' JavaScript and CSS from a CDN, so an offline machine shows
a blank page. The ``fastapi-offline`` package ships those files (Swagger UI, ReDoc, a favicon);
this module serves them from ``/docs-assets`` and builds the two pages with FastAPI's own
``get_swagger_ui_html`` / ``get_redoc_html`` (FastAPI's documented self-hosting recipe).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS = "/docs-assets"


def assets_folder() -> Path:
    """The folder holding ``swagger-ui-bundle.js``, ``swagger-ui.css``, ``redoc.standalone.js``."""
    import fastapi_offline

    return Path(fastapi_offline.__file__).parent / "static"


def add_local_docs(app: FastAPI) -> None:
    """Serve ``/docs`` and ``/redoc`` without any request leaving the server.

    ``app`` must be created with ``docs_url=None, redoc_url=None``.
    """
    app.mount(ASSETS, StaticFiles(directory=assets_folder()), name="docs-assets")
    title = f"{app.title} API"

    @app.get("/docs", include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=title,
            oauth2_redirect_url="/docs/oauth2-redirect",
            swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS}/favicon.png",
        )

    @app.get("/docs/oauth2-redirect", include_in_schema=False)
    def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=title,
            redoc_js_url=f"{ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{ASSETS}/favicon.png",
            with_google_fonts=False,
        )
