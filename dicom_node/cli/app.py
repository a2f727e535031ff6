"""The root ``dicom-node`` command: assembles the command modules, defines none.

Commands and groups are added in the order ``--help`` lists them. Tracebacks are not
prettified: Rich's, with locals, could show patient data.
"""

from __future__ import annotations

from typing import Annotated

import typer

from dicom_node import __version__
from dicom_node.cli.analyze import analyze
from dicom_node.cli.audit import audit_app
from dicom_node.cli.config_cmd import config_app
from dicom_node.cli.db import db_app
from dicom_node.cli.destinations import destinations_app
from dicom_node.cli.feedback import feedback_app
from dicom_node.cli.jobs import jobs_app
from dicom_node.cli.models import models_app
from dicom_node.cli.rules import rules_app
from dicom_node.cli.sends import sends_app
from dicom_node.cli.serve import serve, worker
from dicom_node.cli.status import status
from dicom_node.cli.worklist import worklist

app = typer.Typer(
    name="dicom-node",
    help="DICOM node that screens chest radiographs with AI and reports back to PACS.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,  # tracebacks with locals could show patient data
)


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


app.command("serve")(serve)
app.command("status")(status)
app.command("analyze")(analyze)
app.command("worker")(worker)
app.command("worklist")(worklist)

app.add_typer(db_app, name="db")
app.add_typer(config_app, name="config")
app.add_typer(rules_app, name="rules")
app.add_typer(sends_app, name="sends")
app.add_typer(jobs_app, name="jobs")
app.add_typer(models_app, name="models")
app.add_typer(feedback_app, name="feedback")
app.add_typer(destinations_app, name="destinations")
app.add_typer(audit_app, name="audit")
