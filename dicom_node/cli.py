"""``dicom-node``: the command line (Typer + Rich).

Commands are grouped the way operators think about them: ``serve`` runs the node,
``status`` looks at it, ``db …`` and ``config …`` manage what it runs on, ``rules test``
explains routing, ``sends …`` shows and re-queues the outbox, ``analyze`` runs the engine
offline. New commands are added with ``@app.command()`` or a sub-app like ``db``; every
command takes ``--config`` and loads settings through :func:`load_or_exit`.

Conventions: exit code 2 is "your configuration (or command line) is wrong", with one
line on stderr saying which key and why; machine-readable output (``--json``) goes to
stdout and nothing else does; logs go to stderr.
"""

from __future__ import annotations

import getpass
import json
import signal
import threading
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from dicom_node import __version__
from dicom_node.config import (
    ConfigError,
    LoggingSettings,
    Settings,
    effective_document,
    load_settings,
    to_toml,
)
from dicom_node.logs import configure_logging, get_logger

if TYPE_CHECKING:
    from storage.models import Send

T = TypeVar("T")
S = TypeVar("S", bound=StrEnum)
EXIT_CONFIG = 2
EXIT_FAILURE = 1

app = typer.Typer(
    name="dicom-node",
    help="DICOM node that screens chest radiographs with AI and reports back to PACS.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,  # tracebacks with locals could show patient data
)
db_app = typer.Typer(help="Database schema (Alembic migrations).", no_args_is_help=True)
config_app = typer.Typer(help="Inspect the effective configuration.", no_args_is_help=True)
rules_app = typer.Typer(help="Routing rules.", no_args_is_help=True)
sends_app = typer.Typer(
    help="The outbox: results waiting for, or given up on, delivery.", no_args_is_help=True
)
app.add_typer(db_app, name="db")
app.add_typer(config_app, name="config")
app.add_typer(rules_app, name="rules")
app.add_typer(sends_app, name="sends")

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


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"dicom-node {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version_callback, is_eager=True, help="Print the version."
        ),
    ] = False,
) -> None:
    """DICOM node that screens chest radiographs with AI and reports back to PACS."""


@app.command()
def serve(
    config: ConfigOption = None,
    no_workers: Annotated[
        bool,
        typer.Option("--no-workers", help="Receive and send only; analyse nothing here."),
    ] = False,
) -> None:
    """Run the node: listener, workers, sender and retention in one process."""
    settings = load_or_exit(config)
    configure_logging(settings.logging, settings.storage.log_dir)
    from dicom_node.node import Node, NodeStartError

    stop = threading.Event()
    _install_stop_signals(stop)
    node = Node(settings, workers=not no_workers)
    try:
        node.start()
    except NodeStartError as exc:
        log.error("node cannot start", reason=str(exc))
        typer.echo(f"dicom-node: {exc}", err=True)
        raise typer.Exit(EXIT_FAILURE) from None
    node.serve_until(stop)


def _install_stop_signals(stop: threading.Event) -> None:
    def _handler(signum: int, _frame: FrameType | None) -> None:
        log.info("stop requested", signal=signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)


@app.command()
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
    table.add_row("up since", _shown(listener["up_since"]))
    reach = "reachable" if database["reachable"] else f"UNREACHABLE ({database['error']})"
    table.add_row("database", f"{database['backend']} {database['url']} — {reach}")
    revision = _shown(database["schema_revision"])
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
        table.add_row(f"model ({model['role']})", f"{identity} sha256 {digest}")
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


def _shown(value: object) -> str:
    return "-" if value is None else str(value)


@app.command()
def analyze(
    files: Annotated[list[Path], typer.Argument(help="DICOM files.", exists=True, dir_okay=False)],
    config: ConfigOption = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="One JSON object per input file on stdout.")
    ] = False,
    heatmap_dir: Annotated[
        Path | None, typer.Option("--heatmap-dir", help="Write heatmap overlays here as PNG.")
    ] = None,
) -> None:
    """Run the whole engine offline on DICOM files (no network, no database)."""
    settings = load_for_command(config)
    from rich.progress import Progress

    from dicom_node.analyze import analyze_files, result_record, to_json_line, write_heatmap
    from inference.bundle import BundleError
    from inference.cascade import Cascade

    inference = settings.inference
    _set_threads(inference.threads)
    try:
        cascade = Cascade.load(**inference.cascade_kwargs())
    except BundleError as exc:
        typer.echo(f"dicom-node: {exc}", err=True)
        raise typer.Exit(EXIT_FAILURE) from None
    cascade.heatmaps = inference.heatmaps and heatmap_dir is not None
    console = Console()
    with Progress(console=Console(stderr=True), disable=json_output, transient=True) as bar:
        task = bar.add_task("analysing", total=len(files))
        for path, result in analyze_files(cascade, files, inference.batch_size):
            heatmap = write_heatmap(result, path, heatmap_dir) if heatmap_dir else None
            record = result_record(path, result, heatmap)
            if json_output:
                typer.echo(to_json_line(record))
            else:
                console.print(_analysis_line(record))
            bar.advance(task)


def _set_threads(threads: int) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def _analysis_line(record: dict[str, Any]) -> str:
    name = Path(record["file"]).name
    if record["status"] != "scored":
        return f"[yellow]{name}[/yellow]: {record['status']} — {record['reason']}"
    parts = [
        f"{f['meaning']} {f['probability']:.3f} "
        f"{'[red]PRESENT[/red]' if f['present'] else 'absent'} ({f['stage']})"
        for f in record["findings"]
    ]
    warnings = f" [yellow]({'; '.join(record['warnings'])})[/yellow]" if record["warnings"] else ""
    return f"[bold]{name}[/bold]: " + ", ".join(parts) + warnings


@rules_app.command("test")
def rules_test(
    files: Annotated[list[Path], typer.Argument(help="DICOM files.", exists=True, dir_okay=False)],
    config: ConfigOption = None,
    json_output: JsonOption = False,
    calling_aet: Annotated[
        str | None, typer.Option("--calling-aet", help="Pretend it came from this AE title.")
    ] = None,
    called_aet: Annotated[
        str | None, typer.Option("--called-aet", help="Pretend it was sent to this AE title.")
    ] = None,
) -> None:
    """Which rule routes each file, and why the rules before it did not match."""
    settings = load_for_command(config)
    from dicom_node.rules import rules_test_report

    report = rules_test_report(
        files, settings.rule_set, calling_aet=calling_aet, called_aet=called_aet
    )
    if json_output:
        typer.echo(json.dumps(report))
        return
    console = Console()
    for entry in report:
        _print_route(console, entry)


def _print_route(console: Console, entry: dict[str, Any]) -> None:
    name = Path(entry["file"]).name
    if entry["error"]:
        console.print(f"[bold]{name}[/bold]: [red]{entry['error']}[/red]")
        return
    target = ", ".join(entry["destinations"]) or "no destination"
    headline = (
        f"rule [bold]{entry['rule']}[/bold] → {entry['pipeline']} → {target}"
        if entry["rule"]
        else "[yellow]no rule matched[/yellow]: stored, not analysed"
    )
    default = " (built-in default rule)" if entry["default_rule"] else ""
    console.print(f"[bold]{name}[/bold]: {headline}{default}", highlight=False)
    for trace in entry["trace"]:
        mark = "[green]✓[/green]" if trace["matched"] else "[red]✗[/red]"
        console.print(f"  {mark} {trace['rule']}: {trace['reason']}", highlight=False)


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

    rows = _with_database(
        settings,
        lambda s: [
            _send_row(send)
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
            _shown(when),
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

    requeued = _with_database(
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


def _send_row(send: Send) -> dict[str, Any]:
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


def _with_database(settings: Settings, action: Callable[[Any], T]) -> T:
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


@config_app.command("show")
def config_show(config: ConfigOption = None, json_output: JsonOption = False) -> None:
    """Print the effective configuration as TOML (or JSON; passwords hidden)."""
    settings = load_or_exit(config)
    if json_output:
        typer.echo(json.dumps(effective_document(settings)))
    else:
        typer.echo(to_toml(settings))


@config_app.command("check")
def config_check(config: ConfigOption = None, json_output: JsonOption = False) -> None:
    """Validate the configuration: exit 0 if valid, 2 with the reason if not."""
    settings = load_or_exit(config)
    if json_output:
        summary = {
            "valid": True,
            "destinations": [d.name for d in settings.destinations],
            "rules": [r.name for r in settings.rule_set.effective_rules],
        }
        typer.echo(json.dumps(summary))
    else:
        typer.echo("configuration ok")


from dicom_node.cli_worker import worker  # noqa: E402  (it uses the helpers above)
from dicom_node.cli_worklist import worklist  # noqa: E402

app.command()(worker)
app.command()(worklist)

from dicom_node.cli_destinations import destinations_app  # noqa: E402
from dicom_node.cli_jobs import jobs_app  # noqa: E402
from dicom_node.cli_models import models_app  # noqa: E402

app.add_typer(jobs_app, name="jobs")
app.add_typer(models_app, name="models")
app.add_typer(destinations_app, name="destinations")
