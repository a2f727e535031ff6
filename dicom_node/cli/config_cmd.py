"""``dicom-node config …``: the configuration the node would run with.

``show`` prints the effective settings (file, environment and defaults merged; passwords
hidden); ``check`` validates them and exits 2 with the reason if they are wrong. Named
``config_cmd`` so it is not mistaken for :mod:`dicom_node.config`, which it uses.
"""

from __future__ import annotations

import json

import typer

from dicom_node.cli.common import ConfigOption, JsonOption, load_or_exit
from dicom_node.config import effective_document, to_toml

config_app = typer.Typer(help="Inspect the effective configuration.", no_args_is_help=True)


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
