"""Labelled image folders for training and evaluation.

A folder holds ``labels.csv`` (``path``, ``label`` and, where known, ``patient``) and the
8-bit images it names. Read here, once, by :mod:`inference.train` (the Kermany training
split, the NIH adult sample for the gate) and :mod:`inference.evaluate` (any labelled
folder, e.g. the official test split); neither of those imports the other for it.
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from inference.preprocess import INPUT_SIZE


@dataclass
class Split:
    images: np.ndarray  # N×H×W uint8
    labels: np.ndarray  # N float32 (1 = pneumonia)
    patients: list[str]


def load_kermany(root: Path, limit: int | None = None) -> tuple[Split, Split]:
    """Read labels.csv and the JPEGs, split 85/15 by patient, stratified by label."""
    with (root / "labels.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    if limit:
        rng = random.Random(0)
        rng.shuffle(rows)
        rows = rows[:limit]
    by_patient: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_patient.setdefault(row["patient"], []).append(row)
    val_patients = _pick_validation_patients(by_patient, fraction=0.15)
    train_rows = [r for p, rs in by_patient.items() if p not in val_patients for r in rs]
    val_rows = [r for p, rs in by_patient.items() if p in val_patients for r in rs]
    return _read_split(root, train_rows), _read_split(root, val_rows)


def load_labelled(root: Path, limit: int | None = None) -> Split:
    """A whole labelled folder (e.g. the official test split) as one split."""
    with (root / "labels.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    return _read_split(root, rows[:limit] if limit else rows)


def load_adults(root: Path | None) -> Split | None:
    """A folder of adult frontal chests (``nih-sample``, ``nih-pneumonia``, ``tb-sakha``,
    ``cxr-anatomy``: ``path`` or ``image`` column) for the gate's in-domain reference;
    labels are ignored (every image is a chest radiograph the gate must admit)."""
    if root is None:
        return None
    with (root / "labels.csv").open() as fh:
        rows = [
            {
                "path": r.get("path") or r["image"],
                "label": "normal",
                "patient": r.get("patient", ""),
            }
            for r in csv.DictReader(fh)
        ]
    return _read_split(root, rows)


def _pick_validation_patients(
    by_patient: dict[str, list[dict[str, str]]], fraction: float
) -> set[str]:
    rng = random.Random(20261121)
    chosen: set[str] = set()
    for label in ("normal", "pneumonia"):
        group = sorted(p for p, rs in by_patient.items() if rs[0]["label"] == label)
        rng.shuffle(group)
        chosen.update(group[: max(1, round(len(group) * fraction))])
    return chosen


def _read_split(root: Path, rows: list[dict[str, str]]) -> Split:
    images = np.stack([_read_grey(root / r["path"]) for r in rows])
    labels = np.array([r["label"] == "pneumonia" for r in rows], dtype=np.float32)
    return Split(images, labels, [r.get("patient", "") for r in rows])


def _read_grey(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        grey = img.convert("L")
        if grey.size != (INPUT_SIZE, INPUT_SIZE):
            grey = grey.resize((INPUT_SIZE, INPUT_SIZE), Image.Resampling.BOX)
        return np.asarray(grey, dtype=np.uint8)
