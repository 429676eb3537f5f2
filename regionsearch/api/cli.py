"""``regionsearch serve``: the HTTP API and the web page."""

from __future__ import annotations

from typing import Annotated

import typer

from regionsearch.search.cli import DbUrlOption, IndexDirOption, ModelOverride, NameOption


def register(app: typer.Typer) -> None:
    """Add ``serve`` to the main app."""

    @app.command()
    def serve(
        name: NameOption = "default",
        index_dir_: IndexDirOption = None,
        host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
        port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
        api_key: Annotated[
            str | None,
            typer.Option(envvar="REGIONSEARCH_API_KEY", help="Key required for uploads."),
        ] = None,
        cors_origin: Annotated[
            list[str] | None, typer.Option(help="Allowed CORS origin (repeatable).")
        ] = None,
        read_only: Annotated[
            bool, typer.Option("--read-only", help="Never write to the index (no uploads).")
        ] = False,
        max_upload_mb: Annotated[float, typer.Option(min=0.01)] = 20.0,
        model: ModelOverride = None,
        db_url: DbUrlOption = None,
    ) -> None:
        """Serve the search API (/api, docs at /docs) and the web page (/) for index NAME."""
        import uvicorn

        from regionsearch.api.app import create_app
        from regionsearch.api.settings import Settings
        from regionsearch.search.cli import index_dir

        settings = Settings(
            index_dir=index_dir(name, index_dir_),
            db_url=db_url,
            model=model,
            api_key=api_key,
            cors_origins=list(cors_origin or []),
            read_only=read_only,
            max_upload_bytes=int(max_upload_mb * 1024 * 1024),
        )
        uvicorn.run(create_app(settings), host=host, port=port)
