"""``dicom-node analyze``: the whole engine offline on DICOM files.

No network, no database: the configured cascade scores each file, one line (or one JSON
object) per file, with heatmap overlays as PNG on request — for checking a model bundle
or a difficult image without a running node.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from dicom_node.cli.common import EXIT_FAILURE, ConfigOption, load_for_command


def analyze(
    files: Annotated[list[Path], typer.Argument(help="DICOM files.", exists=True, dir_okay=False)],
    config: ConfigOption = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="One JSON object per input file on stdout.")
    ] = False,
    heatmap_dir: Annotated[
        Path | None, typer.Option("--heatmap-dir", help="Write heatmap overlays here as PNG.")
    ] = None,
    masks_dir: Annotated[
        Path | None,
        typer.Option("--masks-dir", help="Write heart and lung masks here as PNG (source grid)."),
    ] = None,
) -> None:
    """Run the whole engine offline on DICOM files (no network, no database)."""
    settings = load_for_command(config)
    from rich.progress import Progress

    from dicom_node.analyze import (
        analyze_files,
        result_record,
        to_json_line,
        write_heatmap,
        write_masks,
    )
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
            masks = write_masks(result, path, masks_dir) if masks_dir else None
            record = result_record(path, result, heatmap, masks)
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
        if f["status"] == "assessed"
        else f"{f['meaning']} not assessed ({f['reason']})"
        for f in record["findings"]
    ]
    ratio = next(
        (m["value"] for m in record["measurements"] if m["name"] == "cardiothoracic_ratio"),
        None,
    )
    if ratio is not None:
        parts.append(f"CTR {ratio:.2f}")
    warnings = f" [yellow]({'; '.join(record['warnings'])})[/yellow]" if record["warnings"] else ""
    return f"[bold]{name}[/bold]: " + ", ".join(parts) + warnings
