"""Alembic environment of regionsearch.

The database URL is never read from ``alembic.ini``. In order of precedence it comes from:

1. ``config.attributes["connection"]``: an open SQLAlchemy ``Connection`` handed over by
   ``regionsearch.store.db.open_database`` (the normal path: migrations run automatically);
2. ``config.attributes["url"]`` or the main option ``sqlalchemy.url`` set in code;
3. ``alembic -x url=...`` on the command line;
4. the environment variable ``REGIONSEARCH_DATABASE_URL``.

``render_as_batch=True`` so that ALTER-style operations work on SQLite (table copy-and-move).
"""

from __future__ import annotations

import contextlib
import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy import create_engine, pool

from regionsearch.store.models import Base

config = context.config

# Configure logging only when run from the alembic CLI with an ini file that has logging
# sections; never when called from the application (it would reset the app's logging).
if (
    config.config_file_name is not None
    and config.attributes.get("connection") is None
    and config.attributes.get("configure_logger", True)
):
    with contextlib.suppress(KeyError):  # an ini without [loggers]/[handlers]/[formatters]
        fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def _database_url() -> str:
    url = (
        config.attributes.get("url")
        or config.get_main_option("sqlalchemy.url")
        or context.get_x_argument(as_dictionary=True).get("url")
        or os.environ.get("REGIONSEARCH_DATABASE_URL")
    )
    if not url:
        raise RuntimeError(
            "No database URL for migrations: pass -x url=..., set REGIONSEARCH_DATABASE_URL, "
            "or let regionsearch.store.db.open_database() apply them."
        )
    return str(url)


def _configure(**kwargs) -> None:
    context.configure(
        target_metadata=target_metadata,
        render_as_batch=True,
        compare_type=True,
        **kwargs,
    )


def run_migrations_offline() -> None:
    _configure(url=_database_url(), literal_binds=True, dialect_opts={"paramstyle": "named"})
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection=connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_engine(_database_url(), poolclass=pool.NullPool)
    with engine.connect() as connection:
        _configure(connection=connection)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
