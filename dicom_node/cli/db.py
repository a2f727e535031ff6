"""``dicom-node db …``: the database schema and its backups.

``upgrade`` applies the Alembic migrations — ``serve`` does the same at every start, so
this is for preparing a database ahead of a deployment or checking which revision it is at.
``backup`` copies the database while the node runs (SQLite's online backup API, or
``pg_dump`` for PostgreSQL); restoring is described in the README (Storage).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from dicom_node.cli.common import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    ConfigOption,
    JsonOption,
    load_or_exit,
    log,
)
from dicom_node.logs import configure_logging

db_app = typer.Typer(help="Database schema (Alembic migrations) and backups.", no_args_is_help=True)


@db_app.command("upgrade")
def db_upgrade(
    config: ConfigOption = None,
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
    json_output: JsonOption = False,
) -> None:
    """Apply database migrations (also done automatically by ``serve``)."""
    settings = load_or_exit(config)
    configure_logging(settings.logging, settings.storage.log_dir)
    from sqlalchemy.exc import SQLAlchemyError

    from storage.db import current_revision, make_engine, redact_url, upgrade

    url = settings.storage.effective_database_url
    engine = make_engine(url)
    try:
        upgrade(engine, revision)
        now = current_revision(engine)
    except SQLAlchemyError as exc:
        typer.echo(
            f"dicom-node: database {redact_url(url)}: "
            f"{str(getattr(exc, 'orig', None) or exc).splitlines()[0]}",
            err=True,
        )
        raise typer.Exit(EXIT_FAILURE) from None
    finally:
        engine.dispose()
    log.info("database upgraded", url=redact_url(url), revision=now)
    if json_output:
        typer.echo(json.dumps({"database": redact_url(url), "revision": now}))
        return
    Console(stderr=True).print(f"database {redact_url(url)} at revision [bold]{now}[/bold]")


@db_app.command("backup")
def db_backup(
    file: Annotated[Path, typer.Argument(help="Where to write the backup (must not exist).")],
    config: ConfigOption = None,
    json_output: JsonOption = False,
) -> None:
    """Back up the database while the node runs (SQLite: online copy; PostgreSQL: pg_dump).

    SQLite is copied with SQLite's online backup API into ``FILE`` (a consistent copy even
    while the node writes), checked with ``PRAGMA integrity_check``. PostgreSQL is dumped
    with ``pg_dump --format=custom`` when it is installed (restore with ``pg_restore``);
    without it the command prints the ``pg_dump`` command to run and exits 1. The spool
    is not part of it: back it up after the database (see README, Storage).
    """
    settings = load_or_exit(config)
    configure_logging(settings.logging, settings.storage.log_dir)
    from storage.db import backend_name, redact_url

    url = settings.storage.effective_database_url
    target = file.expanduser().absolute()
    if target.exists():
        typer.echo(f"dicom-node: {target} exists; give a new file", err=True)
        raise typer.Exit(EXIT_CONFIG)
    if not target.parent.is_dir():
        typer.echo(f"dicom-node: folder {target.parent} does not exist", err=True)
        raise typer.Exit(EXIT_CONFIG)
    backend = backend_name(url)
    if backend == "sqlite":
        report = _backup_sqlite(url, target)
    elif backend == "postgresql":
        report = _backup_postgres(url, target)
    else:  # pragma: no cover - the configuration accepts these two only
        typer.echo(f"dicom-node: no backup for {backend} databases", err=True)
        raise typer.Exit(EXIT_FAILURE)
    report = {"database": redact_url(url), "backend": backend, **report}
    log.info("database backed up", **report)
    if json_output:
        typer.echo(json.dumps(report))
        return
    Console(stderr=True).print(
        f"database {report['database']} backed up to [bold]{report['file']}[/bold] "
        f"({report['bytes']} bytes, {report['format']})"
    )


def _backup_sqlite(url: str, target: Path) -> dict[str, Any]:
    import sqlite3

    from sqlalchemy.engine import make_url

    source = make_url(url).database
    if not source or source == ":memory:" or not Path(source).is_file():
        typer.echo(f"dicom-node: no SQLite database file at {source!r}", err=True)
        raise typer.Exit(EXIT_FAILURE)
    partial = target.with_name(f".{target.name}.partial")
    try:
        with (
            contextlib.closing(
                sqlite3.connect(f"{Path(source).absolute().as_uri()}?mode=ro", uri=True)
            ) as src,
            contextlib.closing(sqlite3.connect(partial)) as dst,
        ):
            src.execute("PRAGMA busy_timeout = 30000")
            src.backup(dst, pages=1024)  # steps of 1024 pages: writers are not held up
            (verdict,) = dst.execute("PRAGMA integrity_check").fetchone()
            row = dst.execute("SELECT version_num FROM alembic_version").fetchone()
        if verdict != "ok":
            raise sqlite3.DatabaseError(f"integrity check of the copy: {verdict}")
        with partial.open("rb") as handle:
            os.fsync(handle.fileno())
        partial.replace(target)
    except (sqlite3.Error, OSError) as exc:
        partial.unlink(missing_ok=True)
        typer.echo(f"dicom-node: backup of {source} failed: {exc}", err=True)
        raise typer.Exit(EXIT_FAILURE) from None
    return {
        "file": str(target),
        "bytes": target.stat().st_size,
        "format": "sqlite",
        "revision": row[0] if row else None,
    }


def _backup_postgres(url: str, target: Path) -> dict[str, Any]:
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    libpq = parsed.set(drivername="postgresql", password=None).render_as_string()
    command = ["pg_dump", "--format=custom", "--no-owner", f"--file={target}", libpq]
    program = shutil.which("pg_dump")
    if program is None:
        typer.echo(
            "dicom-node: pg_dump is not installed here (PostgreSQL client tools). Run, "
            "where it is, with the password in PGPASSWORD or ~/.pgpass:\n  " + shlex.join(command),
            err=True,
        )
        raise typer.Exit(EXIT_FAILURE)
    env = dict(os.environ)
    if parsed.password is not None:
        env["PGPASSWORD"] = str(parsed.password)  # never on the command line
    result = subprocess.run(
        [program, *command[1:]], env=env, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        target.unlink(missing_ok=True)
        message = (result.stderr.strip().splitlines() or ["no message"])[-1]
        typer.echo(f"dicom-node: pg_dump failed ({result.returncode}): {message}", err=True)
        raise typer.Exit(EXIT_FAILURE)
    return {"file": str(target), "bytes": target.stat().st_size, "format": "pg_dump custom"}
