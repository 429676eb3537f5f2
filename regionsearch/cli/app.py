"""The ``regionsearch`` root command: command groups registered in the order people use them."""

from __future__ import annotations

import typer

from regionsearch.cli import index, lazy, maintenance, search, serve, tools
from regionsearch.cli.errors import EXIT_CODES_HELP

app = typer.Typer(
    name="regionsearch",
    help="Find the region of a photo that matches a text. Index a folder of photos "
    "(every region gets a MaskInversion embedding), then search it with words.",
    epilog=EXIT_CODES_HELP,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,
)

index.register(app)  # index, stats
search.register(app)  # search, refer
serve.register(app)  # serve
tools.register(app)  # explain, models
maintenance.register(app)  # compact
lazy.register(app)  # eval, world


def main() -> None:
    """Console entry point (``regionsearch``); every command maps its errors to the documented
    exit codes itself (:class:`~regionsearch.cli.errors.MappedCommand`)."""
    app()
