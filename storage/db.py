"""Engines, sessions and schema migrations for SQLite and PostgreSQL.

Both backends must behave the same for the rest of the code, so the backend-specific
tuning is concentrated here: SQLite gets WAL, a busy timeout, enforced foreign keys,
``synchronous=FULL`` (a C-STORE success promises durability) and ``BEGIN IMMEDIATE``
transactions (so two associations never deadlock upgrading a read lock to a write
lock); PostgreSQL gets an advisory lock around migrations so that several node
processes starting together do not race to create the schema.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event, make_url, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 30_000
_MIGRATION_LOCK_KEY = 0x0D1C0A1  # arbitrary, constant advisory-lock key for migrations


def backend_name(url: str | URL) -> str:
    """Return ``sqlite`` or ``postgresql`` for a database URL."""
    return make_url(url).get_backend_name()


def redact_url(url: str | URL) -> str:
    """Render a URL for humans and logs, with any password hidden."""
    return make_url(url).render_as_string(hide_password=True)


def make_engine(url: str | URL, **kwargs: Any) -> Engine:
    """Create an engine tuned for the node's write pattern on either backend."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _make_sqlite_engine(parsed, **kwargs)
    return create_engine(parsed, pool_pre_ping=True, future=True, **kwargs)


def _make_sqlite_engine(url: URL, **kwargs: Any) -> Engine:
    if url.database and url.database != ":memory:":
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url,
        pool_pre_ping=True,
        connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
        **kwargs,
    )
    event.listen(engine, "connect", _on_sqlite_connect)
    event.listen(engine, "begin", _on_sqlite_begin)
    return engine


def _on_sqlite_connect(dbapi_connection: sqlite3.Connection, _record: object) -> None:
    """Configure each new SQLite connection; hand transaction control to SQLAlchemy."""
    dbapi_connection.isolation_level = None  # we emit BEGIN ourselves, see _on_sqlite_begin
    cursor = dbapi_connection.cursor()
    try:
        _use_wal(cursor)
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=FULL")
    finally:
        cursor.close()


def _use_wal(cursor: sqlite3.Cursor) -> None:
    """Put the file in WAL mode (persistent: once done, every later connection sees it).

    Switching needs an exclusive lock, and SQLite answers a connection that asks for it
    while another holds the write lock with SQLITE_BUSY at once, without the busy
    handler (it would be a deadlock otherwise) — which is what several processes opening
    a fresh database together meet. So: nothing to do when another connection already
    switched, else retry for as long as the busy timeout allows.
    """
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            if cursor.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _on_sqlite_begin(connection: Connection) -> None:
    """Take the write lock up front, so a read-then-write never fails with SQLITE_BUSY."""
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded attributes usable after commit (we log them)."""
    return sessionmaker(bind=engine, expire_on_commit=False, future=True)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on any exception."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic configuration pointing at the packaged migrations.

    The connection travels in ``attributes`` rather than as a URL option because
    ConfigParser would choke on ``%`` in URL-encoded passwords.
    """
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to ``revision``; safe to call from several processes at once."""
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            lock = text("SELECT pg_advisory_xact_lock(:key)")
            connection.execute(lock, {"key": _MIGRATION_LOCK_KEY})
        command.upgrade(alembic_config(connection), revision)


def current_revision(engine: Engine) -> str | None:
    """The revision the database is at, or ``None`` if it has never been migrated."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head_revision() -> str | None:
    """The newest revision shipped with this version of the code."""
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def dialect_insert(session: Session) -> Any:
    """The backend's own ``insert`` construct: both PostgreSQL and SQLite have
    ``ON CONFLICT DO NOTHING``, which the generic one does not offer."""
    return postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert


def ping(engine: Engine) -> None:
    """Raise if the database cannot be reached (used by ``status``)."""
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))
