"""Database engine, sessions and automatic migrations.

``open_database(url)`` accepts any SQLAlchemy URL (``sqlite:///path/regions.db``,
``postgresql+psycopg2://user:pw@host/db``, ...) and brings its schema to the newest Alembic
revision before returning, so callers never run Alembic by hand.

Where the migrations are: inside the package, ``regionsearch/store/migrations`` (``env.py``,
``script.py.mako``, ``versions/``), located from this module's ``__file__``: the same in a source
checkout, an editable install and a wheel, independent of the current directory. The top-level
``migrations/`` folder of the repository only holds an ``alembic.ini`` and a README for developers
using the Alembic CLI. The Alembic ``Config`` is built in code and the connection is handed to
``env.py`` through ``Config.attributes``; no ini file and no URL in a file is read.

SQLite: every connection gets ``journal_mode=WAL`` (readers never block the writer),
``foreign_keys=ON``, ``synchronous=NORMAL`` and a busy timeout, and the pysqlite driver is put in
real transactional mode (``BEGIN`` emitted by SQLAlchemy) so that DDL in migrations is atomic too.
PostgreSQL: migrations take a transaction-level advisory lock so that two processes opening the
same fresh database do not race.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from regionsearch.errors import RegionSearchError

log = logging.getLogger(__name__)

_PG_MIGRATION_LOCK = 0x7265_6769_6F6E  # "region": arbitrary advisory-lock key
SQLITE_BUSY_TIMEOUT_MS = 30_000


class SchemaTooNewError(RegionSearchError, RuntimeError):
    """The database was migrated by a newer regionsearch than this one."""


def migrations_dir() -> Path:
    """The Alembic script directory shipped with the package."""
    return Path(__file__).resolve().parent / "migrations"


def alembic_config(url: str | URL | None = None):
    """An Alembic ``Config`` built in code (no ini file), pointing at :func:`migrations_dir`."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    cfg.set_main_option("path_separator", "os")
    cfg.attributes["configure_logger"] = False
    if url is not None:
        # Kept out of the ini-style options: '%' in passwords would break interpolation.
        cfg.attributes["url"] = url if isinstance(url, str) else url.render_as_string(False)
    return cfg


def head_revisions() -> set[str]:
    from alembic.script import ScriptDirectory

    return set(ScriptDirectory.from_config(alembic_config()).get_heads())


def current_revisions(engine: Engine) -> set[str]:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return set(MigrationContext.configure(conn).get_current_heads())


def upgrade_database(engine: Engine) -> bool:
    """Apply pending migrations (``upgrade head``). Idempotent; returns True if anything ran."""
    from alembic import command
    from alembic.script import ScriptDirectory

    heads = head_revisions()
    current = current_revisions(engine)
    if current == heads:
        return False
    script = ScriptDirectory.from_config(alembic_config())
    for rev in current:
        try:
            known = script.get_revision(rev) is not None
        except Exception:
            known = False
        if not known:
            raise SchemaTooNewError(
                f"{engine.url.render_as_string(hide_password=True)} is at schema revision "
                f"{rev!r}, which this regionsearch does not know (written by a newer version?): "
                "upgrade regionsearch"
            )
    cfg = alembic_config()
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_MIGRATION_LOCK})")
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
    log.info("database %s migrated %s -> %s", engine.url, sorted(current) or "empty", sorted(heads))
    return True


def _is_memory_sqlite(url: URL) -> bool:
    return url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")


def _install_sqlite_events(engine: Engine, *, memory: bool) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy emit BEGIN itself (pysqlite would skip it before DDL).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        try:
            if not memory:
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN")


def create_db_engine(url: str | URL, **engine_kwargs: Any) -> Engine:
    """``create_engine`` with regionsearch's per-dialect settings (no migrations)."""
    url = make_url(url)
    kwargs: dict[str, Any] = {"future": True}
    if url.get_backend_name() == "sqlite":
        memory = _is_memory_sqlite(url)
        connect_args = {"check_same_thread": False}
        if memory:
            kwargs["poolclass"] = StaticPool  # one shared connection = one in-memory database
        kwargs["connect_args"] = connect_args
        kwargs.update(engine_kwargs)
        engine = create_engine(url, **kwargs)
        _install_sqlite_events(engine, memory=memory)
        return engine
    if url.get_backend_name() == "postgresql":
        kwargs["pool_pre_ping"] = True
    kwargs.update(engine_kwargs)
    return create_engine(url, **kwargs)


@dataclass
class Database:
    """An engine plus its session factory, with the schema at the newest revision."""

    engine: Engine
    sessionmaker: sessionmaker[Session]

    @property
    def url(self) -> URL:
        return self.engine.url

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session in a transaction: committed on success, rolled back on error."""
        with self.sessionmaker.begin() as session:
            yield session

    def dispose(self) -> None:
        self.engine.dispose()


def open_database(url: str | URL, *, migrate: bool = True, **engine_kwargs: Any) -> Database:
    """Open any SQLAlchemy URL and apply pending migrations (``migrate=False`` to skip).

    Raises :class:`SchemaTooNewError` when the database was written by a newer regionsearch.
    """
    engine = create_db_engine(url, **engine_kwargs)
    if migrate:
        try:
            upgrade_database(engine)
        except BaseException:
            engine.dispose()
            raise
    factory = sessionmaker(bind=engine, expire_on_commit=False, future=True)
    return Database(engine=engine, sessionmaker=factory)
