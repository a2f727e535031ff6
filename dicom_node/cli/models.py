"""``dicom-node models …``: which models this configuration runs, and are they intact?

``list`` reads the bundles' manifests (name, version, role, thresholds in force, sha256,
size, path); ``verify`` re-hashes every file a manifest lists and exits 1 on any
mismatch — the check the engine makes at every load, available before a deployment or
after copying bundles between hosts. Neither loads a network or imports torch.
"""

from __future__ import annotations

import json
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn
from rich.table import Table

from dicom_node.cli.common import (
    EXIT_FAILURE,
    ConfigOption,
    JsonOption,
    load_for_command,
    load_or_exit,
    shown,
)
from dicom_node.model_bundles import ConfiguredBundle, configured_bundles, describe_all
from inference.manifest import BundleError, check_files, hashed_size, read_metadata

models_app = typer.Typer(help="Model bundles: describe and verify.", no_args_is_help=True)


@models_app.command("list")
def models_list(config: ConfigOption = None, json_output: JsonOption = False) -> None:
    """The screen and confirm bundles in force, with thresholds and sha256."""
    settings = load_or_exit(config)
    models = describe_all(settings)
    if json_output:
        typer.echo(json.dumps(models))
    else:
        table = Table("role", "name", "version", "thresholds", "sha256", "size", "path")
        for model in models:
            thresholds = ", ".join(f"{k} {v:g}" for k, v in model["thresholds"].items())
            if model.get("threshold_overridden"):
                thresholds += " (configured)"
            size = model["size_bytes"]
            table.add_row(
                model["role"],
                shown(model["name"]),
                shown(model["version"]),
                thresholds or "-",
                (model["sha256"] or "-")[:16],
                f"{size / 1e6:.1f} MB" if size is not None else "-",
                model["path"],
            )
            if model["error"]:
                table.add_row("", f"[red]{model['error']}[/red]", "", "", "", "", "")
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
