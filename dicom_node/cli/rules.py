"""``dicom-node rules test``: which rule routes a file, and why the others did not.

Runs the configured rule set (:func:`dicom_node.rules.rules_test_report`) on DICOM files
without receiving or analysing them, so a rule change can be checked before it is
deployed; ``--calling-aet`` and ``--called-aet`` stand in for the association.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from dicom_node.cli.common import ConfigOption, JsonOption, load_for_command

rules_app = typer.Typer(help="Routing rules.", no_args_is_help=True)


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
