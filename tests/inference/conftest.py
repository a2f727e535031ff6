"""Fixtures for the inference engine: real radiographs from the shared data folder."""

from __future__ import annotations

import os
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

REPO = Path(__file__).resolve().parents[2]

CHEST_FILES = [
    "nih-00000001_000-dx-sc.dcm",
    "rg1-chest-cr-mono1-j2k.dcm",
    "rg1-chest-cr-mono1-jpegls-near.dcm",
    "siim-cr-jpegbaseline-mono1-header.dcm",
    "siim-cr-jpegbaseline.dcm",
]
NON_CHEST_FILES = [
    "dental-cr-modality-lut-jpeglossless.dcm",
    "dog-thorax-dx-lateral.dcm",
    "rg2-hip-cr-jpegextended.dcm",
    "rg2-hip-cr-jpeglossless.dcm",
    "rg3-tibia-cr-j2k-lossless.dcm",
]


def data_root() -> Path:
    """The shared data folder (``CXR_DATA_DIR``); missing data fails, never skips."""
    root = Path(os.environ.get("CXR_DATA_DIR", REPO.parent / "shared" / "data"))
    assert (root / "dicom" / "manifest.csv").is_file(), f"shared data not found at {root}"
    return root


@pytest.fixture(scope="session")
def dicom_dir() -> Path:
    return data_root() / "dicom"


@pytest.fixture(scope="session")
def kermany_dir() -> Path:
    return data_root() / "kermany-train"


@pytest.fixture(scope="session")
def rg1_uncr() -> pydicom.Dataset:
    path = get_testdata_file("RG1_UNCR.dcm")
    assert path, "pydicom-data's RG1_UNCR.dcm is missing (pip install pydicom-data)"
    return pydicom.dcmread(path)


@pytest.fixture(scope="session")
def cascade():  # type: ignore[no-untyped-def]
    from inference.cascade import Cascade

    return Cascade.load()
