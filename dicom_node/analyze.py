"""Offline analysis of DICOM files: the whole engine, no network, no database.

Backs ``dicom-node analyze``. Files are read and analysed in small batches (one forward
pass per stage per batch), results are emitted in input order, one JSON object per file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image
from pydicom.errors import InvalidDicomError

from dicom_node.files import NotDicomError, read_dicom_file
from inference.anatomy import STRUCTURES
from inference.cascade import ERROR, Cascade, ImageResult


def _read(path: Path) -> pydicom.Dataset | ImageResult:
    """The file's data set (Part-10 or raw, as dcmtk reads it), or an error result."""
    try:
        return read_dicom_file(path)
    except NotDicomError as exc:
        return ImageResult(None, ERROR, str(exc))
    except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
        return ImageResult(None, ERROR, f"cannot read DICOM file: {exc}")


def _chunks(paths: list[Path], size: int) -> Iterator[list[Path]]:
    for start in range(0, len(paths), size):
        yield paths[start : start + size]


def analyze_files(
    cascade: Cascade, paths: Iterable[Path], batch_size: int = 8
) -> Iterator[tuple[Path, ImageResult]]:
    """Yield ``(path, result)`` per file, in order; unreadable files become error results."""
    for chunk in _chunks(list(paths), batch_size):
        read = [_read(p) for p in chunk]
        datasets = [r for r in read if isinstance(r, pydicom.Dataset)]
        analysed = iter(cascade.analyze(datasets))
        for path, item in zip(chunk, read, strict=True):
            yield path, next(analysed) if isinstance(item, pydicom.Dataset) else item


def heatmap_filename(path: Path, result: ImageResult) -> str:
    stem = result.sop_instance_uid or path.stem
    return re.sub(r"[^A-Za-z0-9._-]", "_", stem) + ".png"


def write_heatmap(result: ImageResult, path: Path, out_dir: Path) -> Path | None:
    if result.overlay is None:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / heatmap_filename(path, result)
    Image.fromarray(result.overlay).save(target)
    return target


def write_masks(result: ImageResult, path: Path, out_dir: Path) -> list[Path]:
    """Heart, right and left lung masks on the source's grid, one 8-bit PNG (0/255) each,
    named ``<instance>_<structure>.png``: the pixels the SEG carries. Nothing when the
    anatomy was not assessed."""
    found = result.anatomy
    if found is None or not found.assessed or found.source_shape is None:
        return []
    from dicom_node.results.seg import resample_masks  # highdicom: only when asked

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = heatmap_filename(path, result).removesuffix(".png")
    on_source = resample_masks(found.masks, found.source_shape)
    written = []
    for channel, structure in enumerate(STRUCTURES):
        target = out_dir / f"{stem}_{structure.name}.png"
        Image.fromarray(on_source[..., channel].astype(np.uint8) * 255).save(target)
        written.append(target)
    return written


def result_record(
    path: Path, result: ImageResult, heatmap: Path | None, masks: list[Path] | None = None
) -> dict[str, Any]:
    return {
        "file": str(path),
        **result.as_dict(),
        "heatmap": str(heatmap) if heatmap else None,
        **({"masks": [str(m) for m in masks]} if masks is not None else {}),
    }


def to_json_line(record: dict[str, Any]) -> str:
    return json.dumps(record, separators=(",", ":"))
