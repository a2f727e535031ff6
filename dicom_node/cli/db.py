"""``dicom-node db …``: the database schema.

``upgrade`` applies the Alembic migrations — ``serve`` does the same at every start, so
this is for preparing a database ahead of a deployment or checking which revision it is at.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console

from dicom_node.cli.common import EXIT_FAILURE, ConfigOption, JsonOption, load_or_exit, log
from dicom_node.logs import configure_logging

db_app = typer.Typer(help="Database schema (Alembic migrations).", no_args_is_help=True)


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
