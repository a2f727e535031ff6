"""``dicom-node destinations echo``: can the node reach where its results go?

Each configured destination's ``check()`` (C-ECHO for DICOM), all at once, with the
outcome and round-trip time — the first thing to run when sends pile up in the outbox.
Exit 1 if any destination is unreachable, so it serves in scripts and probes too.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from dicom_node.cli.common import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    ConfigOption,
    JsonOption,
    load_for_command,
)
from dicom_node.dispatch.reachability import check_destinations

destinations_app = typer.Typer(
    help="Where results go: check the destinations.", no_args_is_help=True
)


@destinations_app.command("echo")
def destinations_echo(
    names: Annotated[
        list[str] | None, typer.Argument(help="Destination names [default: all].")
    ] = None,
    config: ConfigOption = None,
    json_output: JsonOption = False,
    timeout: Annotated[
        float, typer.Option("--timeout", min=0.1, help="Seconds for each step of a check.")
    ] = 5.0,
) -> None:
    """C-ECHO (check) each destination: outcome and latency (exit 1 if any unreachable)."""
    settings = load_for_command(config)
    configured = {d.name: d for d in settings.destinations}
    unknown = [name for name in names or [] if name not in configured]
    if unknown:
        known = ", ".join(configured) or "none"
        typer.echo(
            f"dicom-node: unknown destination(s) {', '.join(unknown)} (configured: {known})",
            err=True,
        )
        raise typer.Exit(EXIT_CONFIG)
    chosen = [configured[name] for name in names] if names else list(configured.values())
    outcomes = check_destinations(chosen, settings.node.ae_title, timeout_s=timeout)
    if json_output:
        typer.echo(json.dumps([outcome.as_dict() for outcome in outcomes]))
    elif not outcomes:
        typer.echo("no destinations configured")
    else:
        table = Table("destination", "peer", "outcome", "latency", "message")
        for outcome in outcomes:
            mark = (
                "[green]reachable[/green]"
                if outcome.reachable
                else f"[red]{outcome.category}[/red]"
            )
            latency = f"{outcome.latency_ms:.0f} ms" if outcome.latency_ms is not None else "-"
            table.add_row(outcome.name, outcome.peer, mark, latency, outcome.message)
        Console().print(table)
    if not all(outcome.reachable for outcome in outcomes):
        raise typer.Exit(EXIT_FAILURE)
