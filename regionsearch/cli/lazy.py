"""``regionsearch eval`` and ``regionsearch world``, imported only when they run.

Their code lives in :mod:`regionsearch.eval.cli` and :mod:`regionsearch.eval.world.cli`
(``eval``'s imports torch at load time). Here each is a thin command that hands its arguments,
``--help`` included, to the real command once invoked, so that ``regionsearch --help`` never
imports them.

Note for maintainers: when those modules move into this package (they were being edited when
the package was made), replace these wrappers by their ``register`` functions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import typer

from regionsearch.cli.errors import MappedCommand

FORWARD = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


def _eval_command() -> Any:
    from regionsearch.eval.cli import eval_command

    single = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    single.command()(eval_command)
    return typer.main.get_command(single)


def _world_command() -> Any:
    from regionsearch.eval.world.cli import world_app

    return typer.main.get_command(world_app)


def _forwarder(name: str, load: Callable[[], Any]) -> Callable[[typer.Context], None]:
    def forward(ctx: typer.Context) -> None:
        load().main(args=list(ctx.args), prog_name=f"regionsearch {name}", standalone_mode=True)

    return forward


COMMANDS = {
    "eval": (
        _eval_command,
        "Compare region embedders on ground-truth masks (world, COCO, RefCOCO).",
    ),
    "world": (
        _world_command,
        "Synthetic world of coloured shapes: generate datasets, train the reference models.",
    ),
}


def register(app: typer.Typer) -> None:
    """Add ``eval`` and ``world`` to ``app`` (loaded on use)."""
    for name, (load, help_text) in COMMANDS.items():
        app.command(
            name,
            cls=MappedCommand,
            context_settings=FORWARD,
            add_help_option=False,
            help=help_text,
        )(_forwarder(name, load))
