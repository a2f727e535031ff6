"""``dicom-node status``: is the node up, and is it keeping up?

One report from :func:`dicom_node.status.collect_status` — listener, database and schema,
queue, throughput and latency, the processes beating in the database, destinations
(C-ECHO unless ``--no-echo``), models and spool — as a table or one JSON document. Exit 1
when the node is unhealthy, so it serves in scripts and probes too.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from dicom_node.cli.common import EXIT_FAILURE, ConfigOption, load_for_command, shown


def status(
    config: ConfigOption = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="One JSON document on stdout.")
    ] = False,
    no_echo: Annotated[
        bool, typer.Option("--no-echo", help="Do not C-ECHO (check) the destinations.")
    ] = False,
) -> None:
    """Listener, workers, queue, throughput, destinations, models, spool (exit 1 if unhealthy)."""
    settings = load_for_command(config)
    from dicom_node.status import collect_status

    report = collect_status(settings, echo=not no_echo)
    if json_output:
        typer.echo(json.dumps(report, default=str))
    else:
        _print_status(report)
    if not report["healthy"]:
        raise typer.Exit(EXIT_FAILURE)


def _print_status(report: dict[str, Any]) -> None:
    listener, database, spool = report["listener"], report["database"], report["spool"]
    table = Table(title=f"dicom-node {report['version']}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    address = f"{listener['ae_title']} @ {listener['host']}:{listener['port']}"
    table.add_row("listener", f"{address} — {listener['state']}")
    table.add_row("up since", shown(listener["up_since"]))
    reach = "reachable" if database["reachable"] else f"UNREACHABLE ({database['error']})"
    table.add_row("database", f"{database['backend']} {database['url']} — {reach}")
    revision = shown(database["schema_revision"])
    table.add_row("schema", f"{revision} (code expects {database['schema_head']})")
    if database["reachable"] and database["schema_revision"]:
        jobs = ", ".join(f"{state} {count}" for state, count in report["jobs"].items())
        instances = report["instances"]
        table.add_row("jobs", jobs)
        table.add_row(
            "instances", f"{instances['last_hour']} in the last hour, {instances['total']} in total"
        )
        table.add_row("results", ", ".join(f"{k} {v}" for k, v in report["results"].items()))
        for name, states in report["sends"].items():
            counts = ", ".join(f"{state} {count}" for state, count in states.items())
            table.add_row(f"sends → {name}", counts)
        dead = report["dead_letters"]
        table.add_row(
            "dead letters", f"[red]{dead}[/red] (dicom-node sends retry --dead)" if dead else "0"
        )
        _add_activity_rows(table, report)
    _add_destination_rows(table, report)
    for model in report.get("models", []):
        identity = f"{model['name']} {model['version']}" if model["name"] else model["error"]
        digest = (model["sha256"] or "-")[:12]
        shadow = " (shadow)" if model.get("state") == "shadow" else ""
        table.add_row(f"model ({model['role']}){shadow}", f"{identity} sha256 {digest}")
    for warning in report.get("model_warnings", []):
        table.add_row("[yellow]model warning[/yellow]", warning)
    free_gib = spool["free_bytes"] / 1024**3
    table.add_row("spool", f"{spool['path']} — {free_gib:.1f} GiB free ({spool['free_percent']} %)")
    if spool.get("images_bytes") is not None:
        table.add_row("spooled images", f"{spool['images_bytes'] / 1024**3:.2f} GiB")
    Console().print(table)


def _add_activity_rows(table: Table, report: dict[str, Any]) -> None:
    """Queue, throughput and latency, and the processes beating in the database."""
    queue = report["queue"]
    oldest = f", oldest waiting {queue['oldest_wait_s']:.0f} s" if queue["oldest_wait_s"] else ""
    table.add_row("queue", f"{queue['waiting']} waiting, {queue['due']} due{oldest}")
    for window in report["throughput"].values():
        p50, p95 = window["latency_p50_s"], window["latency_p95_s"]
        latency = f"latency p50 {p50:.2f} s, p95 {p95:.2f} s" if p50 is not None else "no latency"
        table.add_row(
            f"last {window['minutes']} min",
            f"{window['finished']} finished ({window['per_minute']}/min), {latency}",
        )
    for node in report["nodes"]:
        place = f"{node['hostname']} pid {node['pid']}"
        beat = f"{node['state']}, last heartbeat {node['last_heartbeat']}"
        table.add_row(node["role"], f"{place} — {beat}")


def _add_destination_rows(table: Table, report: dict[str, Any]) -> None:
    for name, check in report.get("destinations", {}).items():
        if check["reachable"] is None:
            text = "not checked"
        elif check["reachable"]:
            text = f"[green]reachable[/green] ({check['latency_ms']:.0f} ms)"
        else:
            text = f"[red]{check['category']}[/red]: {check['message']}"
        table.add_row(f"destination {name}", text)
