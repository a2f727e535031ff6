"""Pediatric chests of the Kermany training set as DICOM: the pneumonia model's domain.

Upscaled to 512² (the gate refuses matrices under 256 pixels; the JPEGs are 224) with
Patient's Age 003Y — its patients are 1 to 5 years old, and it gives no age per image —
each with fresh UIDs (its own study).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.uid import generate_uid

from tests.nih_dicom import NihImage, dx_dataset

KERMANY_SIDE = 512


@dataclass(frozen=True)
class KermanyCase:
    path: Path
    label: str  # "normal" | "pneumonia"
    study_instance_uid: str
    sop_instance_uid: str


def kermany_cases(
    data_dir: Path, folder: Path, count: int, *, balanced: bool = False, offset: int = 0
) -> list[KermanyCase]:
    """``count`` images from row ``offset`` on; ``balanced`` alternates normal and
    pneumonia (the labels file lists one class after the other)."""
    root = data_dir / "kermany-train"
    with (root / "labels.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if balanced:
        by_label = {
            label: [r for r in rows if r["label"] == label] for label in ("normal", "pneumonia")
        }
        rows = [r for pair in zip(*by_label.values(), strict=False) for r in pair]
    folder.mkdir(parents=True, exist_ok=True)
    cases = []
    for index in range(offset, offset + count):
        row = rows[index % len(rows)]
        grey = Image.open(root / row["path"]).convert("L")
        pixels = np.asarray(grey.resize((KERMANY_SIDE, KERMANY_SIDE), Image.Resampling.BICUBIC))
        image = NihImage(root / row["path"], row["label"], index, 3, "O", "AP", 1024, 0.15)
        ds = dx_dataset(image, pixels.astype(np.uint8))
        ds.PatientName, ds.PatientID = f"KERMANY^{index:04d}", f"KERMANY{index:04d}"
        ds.Manufacturer = "Kermany et al. (test data)"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SOPInstanceUID = generate_uid()
        path = folder / f"kermany-{index:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        cases.append(
            KermanyCase(path, row["label"], str(ds.StudyInstanceUID), str(ds.SOPInstanceUID))
        )
    return cases


def kermany_chests(data_dir: Path, folder: Path, count: int) -> list[Path]:
    return [case.path for case in kermany_cases(data_dir, folder, count)]
