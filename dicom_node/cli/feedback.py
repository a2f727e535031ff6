"""``dicom-node feedback import FILE.csv``: readers' labels, the ground truth of the live
performance (``dicom-node models performance``) and of site recalibration.

Columns: ``study_instance_uid`` or ``sop_instance_uid``, ``finding_code``, ``present``
(1/0), ``reader``, optionally ``source``. All or nothing: a file with one bad row is
refused with every error by line. A later label of the same case and finding
supersedes an earlier one; both stay, with an audit event per import.
"""

from __future__ import annotations

import getpass
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from dicom_node.cli.common import EXIT_FAILURE, ConfigOption, JsonOption, load_for_command
from dicom_node.cli.models import with_registry
from dicom_node.models.feedback import FeedbackError, parse_csv, summary
from storage.registry import add_feedback, known_cases

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

feedback_app = typer.Typer(help="Readers' labels (ground truth).", no_args_is_help=True)


@feedback_app.command("import")
def feedback_import(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, metavar="FILE.csv")],
    source: Annotated[str, typer.Option("--source", help="Source recorded per label.")] = "csv",
    config: ConfigOption = None,
    json_output: JsonOption = False,
) -> None:
    """Import labels from a CSV file (all rows or none)."""
    settings = load_for_command(config)
    try:
        labels = parse_csv(file.read_text(encoding="utf-8-sig"), source)
    except FeedbackError as exc:
        if json_output:
            typer.echo(json.dumps({"imported": 0, "errors": exc.errors}))
        for error in exc.errors:
            typer.echo(f"dicom-node: {file.name}: {error}", err=True)
        raise typer.Exit(EXIT_FAILURE) from None
    except (OSError, UnicodeDecodeError) as exc:
        typer.echo(f"dicom-node: {file}: {exc}", err=True)
        raise typer.Exit(EXIT_FAILURE) from None

    def store(session: Session) -> dict[str, Any]:
        imported = add_feedback(session, labels, actor=f"cli:{getpass.getuser()}")
        return {**summary(labels), "imported": imported, "matched": known_cases(session, labels)}

    report = with_registry(settings, store)
    if json_output:
        typer.echo(json.dumps(report))
    else:
        typer.echo(
            f"imported {report['imported']} labels ({report['present']} present, "
            f"{report['absent']} absent); {report['matched']} name images or studies "
            "scored here"
        )
