"""Exit codes and the one place that turns exceptions into them.

=====  ==============================================================================
code   meaning
=====  ==============================================================================
0      success
1      runtime error: a missing index or file, a model that cannot load, an index built
       with other options ... (one line on stderr, no stack trace)
2      usage error: an unknown option, a malformed or contradictory value, an empty query
3      ``index`` only: finished, but some images failed (listed; ``--retry-failed``)
130    interrupted (Ctrl-C or SIGTERM); ``index`` resumes where it stopped when run again
=====  ==============================================================================

Every command is built with :class:`MappedCommand`, so the mapping also holds under
``typer.testing.CliRunner`` and in sub-apps that tests assemble themselves.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import typer
from typer.core import TyperCommand

from regionsearch.errors import QueryError, RegionSearchError

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_PARTIAL = 3
EXIT_INTERRUPTED = 130

EXIT_CODES_HELP = (
    "Exit status: 0 success, 1 runtime error (one line on stderr), 2 usage error, "
    "3 index: some images failed, 130 interrupted."
)


class CliError(RegionSearchError):
    """A command line that cannot work as given (exit 2): a bad or contradictory value."""


def _say(message: str) -> None:
    typer.echo("error: " + " ".join(str(message).split()), err=True)


@contextlib.contextmanager
def cli_errors() -> Iterator[None]:
    """Print what the user can fix as one line and exit with its code (see the module doc)."""
    try:
        yield
    except (CliError, QueryError) as exc:
        _say(str(exc))
        raise typer.Exit(EXIT_USAGE) from None
    except (RegionSearchError, FileNotFoundError, NotADirectoryError, ImportError) as exc:
        _say(str(exc))
        raise typer.Exit(EXIT_ERROR) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None


class MappedCommand(TyperCommand):
    """A Typer command whose errors exit with the documented codes."""

    def invoke(self, ctx: Any) -> Any:
        with cli_errors():
            return super().invoke(ctx)
