"""``dicom-node sends …``: the outbox, results waiting for or given up on delivery.

``list`` reads; ``retry`` re-queues dead-lettered sends (with a fresh maximum age)
through :func:`storage.outbox.retry_dead`, audited with the operator as actor
(``cli:<user>``).
"""

from __future__ import annotations

import getpass
import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from dicom_node.cli.common import (
    EXIT_FAILURE,
    ConfigOption,
    JsonOption,
    ids_or_every,
    load_for_command,
    send_row,
    shown,
    state_or_exit,
    with_database,
)

sends_app = typer.Typer(
    help="The outbox: results waiting for, or given up on, delivery.", no_args_is_help=True
)


@sends_app.command("list")
def sends_list(
    config: ConfigOption = None,
    json_output: JsonOption = False,
    state: Annotated[
        str | None, typer.Option("--state", help="pending, sending, sent or dead.")
    ] = None,
    destination: Annotated[str | None, typer.Option("--destination", help="Only this one.")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="Most rows shown.")] = 100,
) -> None:
    """Outbox entries, most recently changed first."""
    settings = load_for_command(config)
    from storage.models import SendState

    wanted = state_or_exit(SendState, state)
    from storage.outbox import list_sends

    rows = with_database(
        settings,
        lambda s: [
            send_row(send)
            for send in list_sends(s, state=wanted, destination=destination, limit=limit)
        ],
    )
    if json_output:
        typer.echo(json.dumps(rows, default=str))
        return
    table = Table(
        "id",
        "destination",
        "kind",
        "state",
        "attempts",
        "next attempt / sent",
        "SOP Instance UID",
        "last error",
    )
    for row in rows:
        when = row["sent_at"] if row["state"] == "sent" else row["next_attempt_at"]
        table.add_row(
            str(row["id"]),
            row["destination"],
            row["kind"],
            row["state"],
            str(row["attempts"]),
            shown(when),
            row["sop_instance_uid"],
            (row["last_error"] or "")[:60],
        )
    Console().print(table)


@sends_app.command("retry")
def sends_retry(
    ids: Annotated[list[int] | None, typer.Argument(help="Ids of dead sends.")] = None,
    config: ConfigOption = None,
    json_output: JsonOption = False,
    dead: Annotated[bool, typer.Option("--dead", help="Re-queue every dead send.")] = False,
) -> None:
    """Re-queue dead-lettered sends (with a fresh maximum age)."""
    ids_or_every(ids, dead, "send ids or --dead")
    settings = load_for_command(config)
    from storage.outbox import retry_dead

    requeued = with_database(
        settings, lambda s: retry_dead(s, None if dead else ids, actor=f"cli:{getpass.getuser()}")
    )
    not_dead = sorted(set(ids or []) - set(requeued))
    if json_output:
        typer.echo(json.dumps({"requeued": requeued, "not_dead": not_dead}))
    else:
        typer.echo(
            f"re-queued {len(requeued)} send(s)"
            + (f"; not dead (left alone): {not_dead}" if not_dead else "")
        )
    if not_dead:
        raise typer.Exit(EXIT_FAILURE)
