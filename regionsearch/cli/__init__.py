"""The ``regionsearch`` command line, one package: ``app`` (the root command), ``options``
(each shared option defined once), ``errors`` (exit codes), one module per command group.

Exit codes: 0 success, 1 runtime error, 2 usage error, 3 ``index`` finished with failed
images, 130 interrupted (see :mod:`regionsearch.cli.errors`).
"""

from __future__ import annotations

from regionsearch.cli.app import app, main

__all__ = ["app", "main"]
