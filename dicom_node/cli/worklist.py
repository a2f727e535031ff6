"""``dicom-node worklist``: studies by priority (STAT first), then by arrival.

The list comes from :func:`storage.worklist.worklist` — the same query the HTTP API
serves. Patient identifiers are not in the database; ``--show-phi`` reads them from the
spooled images (:mod:`dicom_node.patient_lookup`), says so on stderr and records the
access in the audit trail. Without it, no name or ID is read, let alone printed.
"""

from __future__ import annotations

import getpass
import json
from datetime import datetime
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy.orm import Session

from dicom_node.cli.common import (
    EXIT_CONFIG,
    ConfigOption,
    JsonOption,
    load_for_command,
    shown,
    with_database,
)
from dicom_node.config import Settings
from dicom_node.patient_lookup import PHI_NOTICE
from storage.worklist import DEFAULT_LIMIT, WorklistEntry, parse_since, priority_levels
from storage.worklist import worklist as query_worklist

_LEVEL_STYLE = {"STAT": "bold red", "URGENT": "yellow", "ROUTINE": "green"}


def worklist(
    config: ConfigOption = None,
    json_output: JsonOption = False,
    since: Annotated[
        str | None,
        typer.Option("--since", help="Studies with an image received since: 2h, 1d or ISO time."),
    ] = None,
    priority: Annotated[
        str | None,
        typer.Option("--priority", help="Only these levels, e.g. STAT,URGENT."),
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="Most studies shown.")] = (
        DEFAULT_LIMIT
    ),
    show_phi: Annotated[
        bool,
        typer.Option("--show-phi", help="Also show patient name and ID (audited)."),
    ] = False,
) -> None:
    """Studies by priority (STAT, URGENT, ROUTINE, none), oldest first within a level."""
    settings = load_for_command(config)
    try:
        moment = parse_since(since) if since else None
        levels = priority_levels(priority.split(",")) if priority else None
    except ValueError as exc:
        typer.echo(f"dicom-node: {exc}", err=True)
        raise typer.Exit(EXIT_CONFIG) from None
    rows = with_database(settings, lambda s: _rows(s, settings, moment, levels, limit, show_phi))
    if show_phi:
        typer.echo(PHI_NOTICE, err=True)
    if json_output:
        typer.echo(json.dumps(rows))
        return
    _print(rows, show_phi)


def _rows(
    session: Session,
    settings: Settings,
    since: datetime | None,
    levels: list[str] | None,
    limit: int,
    show_phi: bool,
) -> list[dict[str, Any]]:
    entries = query_worklist(session, since=since, priorities=levels, limit=limit)
    rows = [entry.as_dict() for entry in entries]
    if show_phi:
        _add_patients(session, settings, entries, rows)
    return rows


def _add_patients(
    session: Session, settings: Settings, entries: list[WorklistEntry], rows: list[dict[str, Any]]
) -> None:
    from dicom_node.patient_lookup import patient_labels
    from storage.spool import Spool

    labels = patient_labels(
        session,
        Spool(settings.storage.spool_root),
        [entry.study_instance_uid for entry in entries],
        actor=f"cli:{getpass.getuser()}",
    )
    for row in rows:
        label = labels[row["study_instance_uid"]]
        row["patient_name"], row["patient_id"] = label.name, label.patient_id


def _print(rows: list[dict[str, Any]], show_phi: bool) -> None:
    table = Table("priority", "score", "top finding", "status", "accession", "received", "images")
    if show_phi:
        table.add_column("patient")
        table.add_column("patient ID")
    table.add_column("Study Instance UID")
    for row in rows:
        level = row["priority"]
        finding = (
            f"{row['top_finding']} {row['top_probability']:.2f}" if row["top_finding"] else "-"
        )
        cells = [
            f"[{_LEVEL_STYLE[level]}]{level}[/]" if level else "-",
            "-" if row["priority_score"] is None else f"{row['priority_score']:.3f}",
            finding,
            row["status"],
            shown(row["accession_number"]),
            _local(row["first_received_at"]),
            str(row["instances"]),
        ]
        if show_phi:
            cells += [row["patient_name"], row["patient_id"]]
        table.add_row(*cells, row["study_instance_uid"])
    console = Console()
    console.print(table, highlight=False)
    if not rows:
        console.print("no studies")


def _local(iso: str) -> str:
    return datetime.fromisoformat(iso).astimezone().strftime("%Y-%m-%d %H:%M:%S")
