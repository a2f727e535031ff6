"""``dicom-node models …``: the model registry from the command line.

``install`` checks a bundle and copies it read-only into ``<home>/models``; ``list``
shows every version per finding with its state; ``activate``, ``rollback`` and
``shadow`` change what runs (atomic, audited with ``--reason``; running workers follow
within seconds); ``compare`` and ``performance`` measure versions against each other and
against readers' feedback; ``calibrate`` derives a site version; ``verify`` re-hashes
the configured bundles. None of them loads a network or imports torch.
"""

from __future__ import annotations

import getpass
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn
from rich.table import Table

from dicom_node.cli.common import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    ConfigOption,
    JsonOption,
    load_for_command,
    load_or_exit,
    shown,
    with_database,
)
from dicom_node.config import Settings
from dicom_node.model_bundles import ConfiguredBundle, configured_bundles
from dicom_node.models import registry
from dicom_node.models.feedback import FeedbackError
from dicom_node.models.registry import RegistryError
from inference.manifest import BundleError, check_files, hashed_size, read_metadata

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

models_app = typer.Typer(
    help="Model registry: install, activate, shadow, compare, performance, calibrate.",
    no_args_is_help=True,
)
ReasonOption = Annotated[
    str | None, typer.Option("--reason", help="Why (kept in the audit trail).")
]
T = TypeVar("T")


def _actor() -> str:
    return f"cli:{getpass.getuser()}"


def with_registry(settings: Settings, action: Callable[[Session], T]) -> T:
    """Run ``action`` on the migrated database; a refused request exits 1 with why."""
    from storage.db import make_engine, upgrade

    engine = make_engine(settings.storage.effective_database_url)
    try:
        upgrade(engine)
    finally:
        engine.dispose()
    try:
        return with_database(settings, action)
    except (RegistryError, FeedbackError) as exc:
        typer.echo(f"dicom-node: {exc}", err=True)
        raise typer.Exit(EXIT_FAILURE) from None


def _emit(json_output: bool, document: Any, human: str) -> None:
    typer.echo(json.dumps(document) if json_output else human)


@models_app.command("install")
def models_install(
    folder: Annotated[Path, typer.Argument(help="Bundle folder.", exists=True, file_okay=False)],
    config: ConfigOption = None,
    json_output: JsonOption = False,
) -> None:
    """Check a bundle (sha256, card, labels, population) and install it read-only."""
    settings = load_for_command(config)

    def install(session: Session) -> dict[str, Any]:
        row = registry.install(session, settings, folder.resolve(), actor=_actor())
        return {
            "name_version": f"{row.name}@{row.version}",
            "finding": row.finding,
            "finding_code": row.finding_code,
            "role": row.role,
            "sha256": row.sha256,
            "path": row.path,
        }

    done = with_registry(settings, install)
    _emit(json_output, done, f"installed {done['name_version']} ({done['finding']} {done['role']})")


@models_app.command("activate")
def models_activate(
    ref: Annotated[str, typer.Argument(metavar="NAME@VERSION")],
    reason: ReasonOption = None,
    config: ConfigOption = None,
    json_output: JsonOption = False,
) -> None:
    """Put an installed version in force for its finding (workers follow within seconds)."""
    settings = load_for_command(config)

    def activate(session: Session) -> dict[str, Any]:
        row = registry.activate(session, ref, actor=_actor(), reason=reason)
        return {"name_version": ref, "finding": row.finding, "role": row.role, "state": "active"}

    done = with_registry(settings, activate)
    _emit(json_output, done, f"{ref} is now the active {done['role']} model for {done['finding']}")


@models_app.command("rollback")
def models_rollback(
    finding: Annotated[str, typer.Argument(help="Finding name or code.")],
    reason: ReasonOption = None,
    config: ConfigOption = None,
    json_output: JsonOption = False,
) -> None:
    """Undo the finding's last activation."""
    settings = load_for_command(config)

    def rollback(session: Session) -> dict[str, Any]:
        role, row = registry.rollback(session, finding, actor=_actor(), reason=reason)
        now = "configured" if row is None else f"{row.name}@{row.version}"
        return {"finding": finding, "role": role, "name_version": now}

    done = with_registry(settings, rollback)
    _emit(json_output, done, f"{finding} {done['role']}: {done['name_version']} is in force again")


@models_app.command("shadow")
def models_shadow(
    ref: Annotated[str | None, typer.Argument(metavar="NAME@VERSION")] = None,
    off: Annotated[bool, typer.Option("--off", help="Stop the shadow run.")] = False,
    finding: Annotated[
        str | None, typer.Option("--finding", help="With --off: the finding.")
    ] = None,
    reason: ReasonOption = None,
    config: ConfigOption = None,
    json_output: JsonOption = False,
) -> None:
    """Run a candidate after the active model on every image; stored, never sent."""
    settings = load_for_command(config)
    if ref is None and not off:
        typer.echo("dicom-node: give NAME@VERSION, or --off", err=True)
        raise typer.Exit(EXIT_CONFIG)

    def shadow(session: Session) -> dict[str, Any]:
        if off:
            which = finding or (registry.version_of(session, ref).finding if ref else None)
            registry.shadow(session, None, finding=which, actor=_actor(), reason=reason)
            return {"finding": which, "shadow": None}
        row = registry.shadow(session, ref, finding=None, actor=_actor(), reason=reason)
        assert row is not None
        return {"finding": row.finding, "shadow": ref}

    done = with_registry(settings, shadow)
    human = (
        f"{done['finding']}: shadow run stopped"
        if done["shadow"] is None
        else f"{ref} now runs as the shadow of {done['finding']}"
    )
    _emit(json_output, done, human)


@models_app.command("compare")
def models_compare(
    first: Annotated[str, typer.Argument(metavar="A")],
    second: Annotated[str, typer.Argument(metavar="B")],
    config: ConfigOption = None,
    json_output: JsonOption = False,
) -> None:
    """Agreement, flips, score correlation and labelled performance of A and B."""
    settings = load_for_command(config)
    from dicom_node.models.compare import compare

    report = with_registry(settings, lambda session: compare(session, first, second))
    if json_output:
        typer.echo(json.dumps(report))
        return
    table = Table(
        "finding", "paired", "agreement", "A→B +", "A→B −", "pearson", "AUROC A", "AUROC B"
    )
    for entry in report["findings"]:
        perf_a, perf_b = entry["performance_a"] or {}, entry["performance_b"] or {}
        table.add_row(
            entry["finding_code"],
            str(entry["n_paired"]),
            shown(entry["agreement"]),
            str(entry["flips"]["absent_to_present"]),
            str(entry["flips"]["present_to_absent"]),
            shown(entry["pearson"]),
            shown(perf_a.get("auroc")),
            shown(perf_b.get("auroc")),
        )
    Console().print(f"A = {first}, B = {second}", highlight=False)
    Console().print(table)


@models_app.command("performance")
def models_performance(
    finding: Annotated[
        str | None, typer.Option("--finding", help="Finding code (e.g. 233604007).")
    ] = None,
    config: ConfigOption = None,
    json_output: JsonOption = False,
) -> None:
    """Live performance per version against readers' feedback, beside the card."""
    settings = load_for_command(config)
    from dicom_node.models.performance import performance

    report = with_registry(
        settings,
        lambda session: performance(session, registry.cards(settings, session), finding),
    )
    if json_output:
        typer.echo(json.dumps(report))
        return
    table = Table(
        "finding",
        "model",
        "version",
        "role",
        "n",
        "prevalence",
        "AUROC (95 % CI)",
        "sens",
        "spec",
        "ECE",
        "card AUROC",
    )
    for entry in report:
        ci = entry["auroc_ci"]
        card = entry["card"] or {}
        table.add_row(
            entry["finding_code"],
            entry["model"],
            entry["version"],
            entry["role"],
            str(entry["n_labelled"]),
            shown(entry["prevalence"]),
            f"{shown(entry['auroc'])} ({shown(ci[0])}–{shown(ci[1])})",
            shown(entry["sensitivity"]),
            shown(entry["specificity"]),
            shown(entry["ece"]),
            shown(card.get("auroc")) + (" [red]below[/red]" if entry["below_card"] else ""),
        )
    Console().print(table)
    if not report:
        Console().print("no labelled cases yet (dicom-node feedback import FILE.csv)")


@models_app.command("calibrate")
def models_calibrate(
    finding_code: Annotated[str, typer.Argument(metavar="FINDING_CODE")],
    target_sensitivity: Annotated[
        float, typer.Option("--target-sensitivity", help="Sensitivity the threshold must reach.")
    ],
    config: ConfigOption = None,
    json_output: JsonOption = False,
) -> None:
    """Fit temperature and threshold on this site's feedback; install a derived version."""
    settings = load_for_command(config)
    from dicom_node.models.calibrate import calibrate

    def run(session: Session) -> dict[str, Any]:
        return calibrate(session, settings, finding_code, target_sensitivity, actor=_actor())[1]

    report = with_registry(settings, run)
    if json_output:
        typer.echo(json.dumps(report))
        return
    typer.echo(report["name_version"])
    typer.echo(
        f"temperature {report['temperature']} (95 % CI {report['temperature_ci']}), "
        f"threshold {report['threshold']} (95 % CI {report['threshold_ci']}), "
        f"sensitivity {report['sensitivity']} {report['sensitivity_ci']}, "
        f"specificity {report['specificity']} {report['specificity_ci']}, "
        f"n={report['n_cases']}",
        err=True,
    )


@models_app.command("list")
def models_list(config: ConfigOption = None, json_output: JsonOption = False) -> None:
    """Every version per finding: configured and installed, which is active, which shadow."""
    settings = load_or_exit(config)
    models = with_registry(settings, lambda session: registry.listing(settings, session))
    if json_output:
        typer.echo(json.dumps(models))
    else:
        table = Table(
            "finding", "role", "name", "version", "state", "thresholds", "sha256", "source"
        )
        for model in models:
            thresholds = ", ".join(f"{k} {v:g}" for k, v in model["thresholds"].items())
            if model.get("threshold_overridden"):
                thresholds += " (configured)"
            state = model["state"]
            styled = {"active": "[green]active[/green]", "shadow": "[yellow]shadow[/yellow]"}
            table.add_row(
                model["finding"],
                model["role"],
                shown(model["name"]),
                shown(model["version"]),
                styled.get(state, state),
                thresholds or "-",
                (model["sha256"] or "-")[:16],
                model["source"],
            )
            if model["error"]:
                table.add_row("", "", f"[red]{model['error']}[/red]", "", "", "", "", "")
        Console().print(table)
    if any(model["error"] for model in models):
        raise typer.Exit(EXIT_FAILURE)


@models_app.command("verify")
def models_verify(config: ConfigOption = None, json_output: JsonOption = False) -> None:
    """Re-hash every bundle file against its manifest (exit 1 on any mismatch)."""
    settings = load_for_command(config)
    bundles = configured_bundles(settings)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        console=Console(stderr=True),
        disable=json_output,
        transient=True,
    ) as progress:
        reports = [_verify(bundle, progress) for bundle in bundles]
    if json_output:
        typer.echo(json.dumps(reports))
    else:
        _print_verification(reports)
    if not all(report["ok"] for report in reports):
        raise typer.Exit(EXIT_FAILURE)


def _verify(bundle: ConfiguredBundle, progress: Progress) -> dict[str, Any]:
    report: dict[str, Any] = {
        "role": bundle.role,
        "path": str(bundle.path),
        "name": None,
        "ok": False,
        "files": [],
        "error": None,
    }
    try:
        meta = read_metadata(bundle.path)
        report["name"] = meta.get("name")
        task = progress.add_task(
            f"{bundle.role} {meta.get('name')}", total=hashed_size(bundle.path, meta)
        )
        for check in check_files(bundle.path, meta, lambda n: progress.advance(task, n)):
            report["files"].append(
                {
                    "file": check.relpath,
                    "ok": check.ok,
                    "expected_sha256": check.expected,
                    "actual_sha256": check.actual,
                    "size_bytes": check.size_bytes,
                }
            )
    except BundleError as exc:
        report["error"] = str(exc)
        return report
    report["ok"] = all(file["ok"] for file in report["files"])
    return report


def _print_verification(reports: list[dict[str, Any]]) -> None:
    console = Console()
    for report in reports:
        head = f"{report['role']} {report['name'] or ''} ({report['path']})"
        if report["error"]:
            console.print(f"[red]✗[/red] {head}: {report['error']}", highlight=False)
            continue
        mark = "[green]✓[/green]" if report["ok"] else "[red]✗[/red]"
        console.print(f"{mark} {head}", highlight=False)
        for file in report["files"]:
            if file["ok"]:
                console.print(f"    ok        {file['file']}", highlight=False)
            elif file["actual_sha256"] is None:
                console.print(f"    [red]MISSING[/red]   {file['file']}", highlight=False)
            else:
                console.print(
                    f"    [red]MISMATCH[/red]  {file['file']}: "
                    f"sha256 {file['actual_sha256'][:16]}…, "
                    f"manifest says {file['expected_sha256'][:16]}…",
                    highlight=False,
                )
