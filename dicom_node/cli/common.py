"""What every command shares: option types, exit codes, settings and database access.

The conventions of the package docstring live here: :func:`load_or_exit` turns a
configuration error into exit code 2 with one line on stderr, :data:`JsonOption` is the
``--json`` every admin command takes, and :func:`load_for_command` keeps one-shot
commands' logs to warnings on stderr. This module imports no command module, so any of
them can use it.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from dicom_node.config import ConfigError, LoggingSettings, Settings, load_settings
from dicom_node.logs import configure_logging, get_logger

if TYPE_CHECKING:
    from storage.models import Send

T = TypeVar("T")
S = TypeVar("S", bound=StrEnum)
EXIT_CONFIG = 2
EXIT_FAILURE = 1

JsonOption = Annotated[bool, typer.Option("--json", help="JSON on stdout (logs on stderr).")]
ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config", "-c", help="TOML config file [default: $DICOM_NODE_CONFIG].", dir_okay=False
    ),
]
log = get_logger("dicom_node.cli")


def load_or_exit(config: Path | None, **overrides: Any) -> Settings:
    """Load settings or exit 2 with one line on stderr naming the bad key."""
    try:
        return load_settings(config, **overrides)
    except ConfigError as exc:
        typer.echo(f"dicom-node: invalid configuration: {exc}", err=True)
        raise typer.Exit(EXIT_CONFIG) from None


def load_for_command(config: Path | None) -> Settings:
    """Settings for a one-shot command (or exit 2): it logs warnings and errors only, as
    JSON, never to the node's log file."""
    settings = load_or_exit(config)
    configure_logging(LoggingSettings(level="WARNING", to_file=False, format="json"))
    return settings


def ids_or_every(ids: list[int] | None, every: bool, choices: str) -> None:
    """Exit 2 unless exactly one of ``ids`` and the ``every`` flag was given."""
    if bool(ids) == every:
        typer.echo(f"dicom-node: give {choices} (not both)", err=True)
        raise typer.Exit(EXIT_CONFIG)


def state_or_exit(states: type[S], state: str | None) -> S | None:
    """``--state`` as one of ``states`` (None when not given), or exit 2 naming them."""
    try:
        return states(state) if state else None
    except ValueError:
        typer.echo(f"dicom-node: --state must be one of {', '.join(states)}", err=True)
        raise typer.Exit(EXIT_CONFIG) from None


def with_database(settings: Settings, action: Callable[[Any], T]) -> T:
    """Run ``action(session)`` on the node's (already migrated) database, or exit 1."""
    from sqlalchemy.exc import SQLAlchemyError

    from storage.db import make_engine, make_session_factory, redact_url, session_scope

    url = settings.storage.effective_database_url
    engine = make_engine(url)
    try:
        with session_scope(make_session_factory(engine)) as session:
            return action(session)
    except SQLAlchemyError as exc:
        message = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        typer.echo(f"dicom-node: database {redact_url(url)}: {message}", err=True)
        raise typer.Exit(EXIT_FAILURE) from None
    finally:
        engine.dispose()


def send_row(send: Send) -> dict[str, Any]:
    """One outbox entry as ``sends list`` and ``jobs show`` print it (and as JSON)."""
    return {
        "id": send.id,
        "destination": send.destination,
        "kind": send.kind,
        "state": send.state.value,
        "attempts": send.attempts,
        "sop_instance_uid": send.sop_instance_uid,
        "study_instance_uid": send.study_instance_uid,
        "first_enqueued_at": send.first_enqueued_at.isoformat(),
        "next_attempt_at": send.next_attempt_at.isoformat(),
        "last_attempt_at": send.last_attempt_at.isoformat() if send.last_attempt_at else None,
        "sent_at": send.sent_at.isoformat() if send.sent_at else None,
        "last_error": send.last_error,
    }


def shown(value: object) -> str:
    """A table cell: ``-`` for a missing value."""
    return "-" if value is None else str(value)
