"""``dicom-node audit …``: read the append-only audit trail.

``list`` shows events newest first — what the listener stored or refused, job and send
transitions, and every access through the HTTP API (``api.*``: who, by role and token
fingerprint, from which address, read which study or did what). Events carry UIDs, ids,
AE titles and addresses, never patient demographics, so the output may go to auditors.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from dicom_node.cli.common import (
    EXIT_CONFIG,
    ConfigOption,
    JsonOption,
    load_for_command,
    shown,
    with_database,
)

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

audit_app = typer.Typer(help="The audit trail (append-only).", no_args_is_help=True)

DETAIL_KEYS = ("role", "token", "method", "path", "params", "query", "from", "to")


@audit_app.command("list")
def audit_list(
    config: ConfigOption = None,
    json_output: JsonOption = False,
    since: Annotated[
        str | None,
        typer.Option("--since", help="Events since: 30m, 2h, 1d or an ISO time."),
    ] = None,
    kind: Annotated[
        list[str] | None,
        typer.Option(
            "--kind",
            help="Only this kind (repeat, or comma-separated); 'api.' or 'job.*' is a prefix.",
        ),
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="Most events shown.")] = 100,
) -> None:
    """Audit events, newest first."""
    settings = load_for_command(config)
    from storage.worklist import parse_since

    try:
        moment = parse_since(since) if since else None
    except ValueError as exc:
        typer.echo(f"dicom-node: {exc}", err=True)
        raise typer.Exit(EXIT_CONFIG) from None
    kinds = [part.strip() for value in kind or [] for part in value.split(",") if part.strip()]
    rows = with_database(settings, lambda s: _rows(s, moment, kinds, limit))
    if json_output:
        typer.echo(json.dumps(rows))
        return
    _print(rows)


def _rows(
    session: Session, since: datetime | None, kinds: list[str], limit: int
) -> list[dict[str, Any]]:
    from storage.audit import event_as_dict, list_events

    return [event_as_dict(e) for e in list_events(session, since=since, kinds=kinds, limit=limit)]


def _print(rows: list[dict[str, Any]]) -> None:
    table = Table("id", "time", "kind", "actor", "peer", "job", "SOP Instance UID", "details")
    for row in rows:
        table.add_row(
            str(row["id"]),
            _local(row["occurred_at"]),
            row["kind"],
            row["actor"],
            shown(row["peer_address"]),
            shown(row["job_id"]),
            shown(row["sop_instance_uid"]),
            _details(row["details"]),
        )
    console = Console()
    console.print(table, highlight=False)
    if not rows:
        console.print("no events")


def _details(details: dict[str, Any] | None) -> str:
    """The details worth a column, the usual keys first; the rest with ``--json``."""
    if not details:
        return "-"
    keys = [k for k in DETAIL_KEYS if k in details] + [k for k in details if k not in DETAIL_KEYS]
    text = " ".join(f"{key}={_compact(details[key])}" for key in keys)
    return text if len(text) <= 120 else text[:119] + "…"


def _compact(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def _local(iso: str) -> str:
    return datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M:%S")
