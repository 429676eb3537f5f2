"""``regionsearch serve``: the HTTP API and the web page."""

from __future__ import annotations

from typing import Annotated

import typer

from regionsearch.cli.errors import CliError, MappedCommand
from regionsearch.cli.options import (
    DbUrlOption,
    IndexDirOption,
    ModelOverride,
    NameOption,
    VectorsOption,
    index_location,
)


def serve(
    name: NameOption = "default",
    index_dir: IndexDirOption = None,
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="REGIONSEARCH_API_KEY",
            help="Key required for uploads (header X-API-Key): guards the index against "
            "other programs and users that can reach the port.",
        ),
    ] = None,
    cors_origin: Annotated[
        list[str] | None,
        typer.Option(
            help="A web origin (e.g. https://app.example) trusted to call the API from a "
            "browser, uploads included; pages of other origins cannot upload (repeatable)."
        ),
    ] = None,
    read_only: Annotated[
        bool, typer.Option("--read-only", help="Never write to the index (no uploads).")
    ] = False,
    max_upload_mb: Annotated[float, typer.Option(min=0.01)] = 20.0,
    model: ModelOverride = None,
    db_url: DbUrlOption = None,
    vectors: VectorsOption = None,
) -> None:
    """Serve the search API (/api, docs at /docs) and the web page (/) for index NAME.

    The index stays free for `regionsearch index` while the server runs: only an upload
    takes the index's write lock, for as long as it writes.
    """
    import uvicorn
    from pydantic import ValidationError

    from regionsearch.api.app import create_app, open_state
    from regionsearch.api.settings import Settings

    try:
        settings = Settings(
            index_dir=index_location(name, index_dir),
            db_url=db_url,
            vectors=vectors,
            model=model,
            api_key=api_key,
            cors_origins=list(cors_origin or []),
            read_only=read_only,
            max_upload_bytes=int(max_upload_mb * 1024 * 1024),
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "settings"
        flag = {"cors_origins": "--cors-origin"}.get(field, "--" + field.replace("_", "-"))
        raise CliError(f"{flag}: {first['msg'].removeprefix('Value error, ')}") from None
    state = open_state(settings)  # a missing index or model: one line, before the server starts
    app = create_app(settings, state_factory=lambda _settings, _backbone: state)
    uvicorn.run(app, host=host, port=port)


def register(app: typer.Typer) -> None:
    """Add ``serve`` to ``app``."""
    app.command("serve", cls=MappedCommand)(serve)
