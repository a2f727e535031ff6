"""Inputs of the result writers' tests: real chest radiographs and engine results.

The sources are the real chest files of the shared data folder (``CXR_DATA_DIR``, default
``../shared/data``) plus pydicom-data's ``RG1_UNCR.dcm``; missing data fails the tests
rather than skipping them. They differ where it matters to the writers: an SC-class NIH
image without most Type 2 patient/study attributes and with an invalid Patient's Age, CR
images with and without Patient Orientation, lossy and uncompressed, 1024 and ~2000 px.

Results are built directly (no networks run): a :class:`Finding` and an overlay rendered by
the engine's own :func:`inference.explain.render_overlay` from a synthetic heatmap.
"""

from __future__ import annotations

import os
from copy import deepcopy
from functools import cache
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from inference.bundle import Label
from inference.cascade import SCORED, Finding, ImageResult
from inference.explain import render_overlay

REPO = Path(__file__).resolve().parents[1]
RG1_UNCR = "RG1_UNCR.dcm"
CHEST_SOURCES = (
    "nih-00000001_000-dx-sc.dcm",
    "rg1-chest-cr-mono1-j2k.dcm",
    "siim-cr-jpegbaseline.dcm",
    RG1_UNCR,
)
PNEUMONIA = Label("pneumonia", "233604007", "SCT", "Pneumonia")
SCREEN_MODEL = ("cxr_pneumonia_screen_mobilenetv3", "1.2.0")
CONFIRM_MODEL = ("cxr_pneumonia_confirm_resnet18", "1.1.0")
# (present, stage) combinations the writers must handle.
OUTCOMES = ((True, "confirm"), (False, "confirm"), (True, "screen"), (False, "screen"))


def data_root() -> Path:
    root = Path(os.environ.get("CXR_DATA_DIR", REPO.parent / "shared" / "data"))
    assert (root / "dicom" / "manifest.csv").is_file(), f"shared data not found at {root}"
    return root


def source_path(name: str) -> Path:
    if name == RG1_UNCR:
        found = get_testdata_file(RG1_UNCR)
        assert isinstance(found, str), "pydicom-data's RG1_UNCR.dcm is missing"
        return Path(found)
    path = data_root() / "dicom" / name
    assert path.is_file(), f"{path} is missing"
    return path


@cache
def _read(name: str) -> Dataset:
    return pydicom.dcmread(source_path(name))


def read_source(name: str) -> Dataset:
    """A fresh copy of the source (tests may change it without affecting others)."""
    return deepcopy(_read(name))


def make_finding(
    present: bool = True,
    stage: str = "confirm",
    *,
    probability: float | None = None,
    threshold: float = 0.5,
    version: str | None = None,
) -> Finding:
    name, default_version = CONFIRM_MODEL if stage == "confirm" else SCREEN_MODEL
    if probability is None:
        probability = 0.8731 if present else 0.1234
    return Finding(
        PNEUMONIA, probability, present, stage, threshold, name, version or default_version
    )


def render_test_overlay(source: Dataset) -> np.ndarray:
    """An overlay as the engine renders it: a Gaussian hot spot over a grey ramp."""
    return _overlay(int(source.Rows), int(source.Columns))


@cache
def _overlay(rows: int, cols: int) -> np.ndarray:
    y, x = np.ogrid[0:rows, 0:cols]
    heat = np.exp(
        -(((y - rows * 0.55) / (rows * 0.15)) ** 2 + ((x - cols * 0.3) / (cols * 0.15)) ** 2)
    )
    display = np.broadcast_to(x / cols, (rows, cols))
    overlay = render_overlay(
        display.astype(np.float32), heat.astype(np.float32), "Pneumonia p=0.87 (confirm)"
    )
    overlay.flags.writeable = False  # shared between tests
    return overlay


def make_result(
    source: Dataset,
    findings: list[Finding] | None = None,
    *,
    overlay: bool = True,
    in_domain: bool | None = True,
    ood_distance: float | None = 4.2,
    warnings: list[str] | None = None,
) -> ImageResult:
    return ImageResult(
        sop_instance_uid=str(source.SOPInstanceUID),
        status=SCORED,
        findings=findings if findings is not None else [make_finding()],
        in_domain=in_domain,
        ood_distance=ood_distance,
        warnings=warnings or [],
        overlay=render_test_overlay(source) if overlay else None,
    )
