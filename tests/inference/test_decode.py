"""Pixel decoding of real radiographs in every encoding the shared corpus holds."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
import pytest

from inference.decode import DecodeError, decode

from .conftest import CHEST_FILES, NON_CHEST_FILES


@pytest.mark.parametrize("name", CHEST_FILES + NON_CHEST_FILES)
def test_every_radiograph_decodes_to_a_display_image(dicom_dir: Path, name: str) -> None:
    ds = pydicom.dcmread(dicom_dir / name)
    image = decode(ds)
    assert image.pixels.shape == (ds.Rows, ds.Columns)
    assert image.pixels.dtype == np.float32
    assert image.pixels.min() >= 0.0 and image.pixels.max() <= 1.0
    assert image.pixels.std() > 0.05, "the display image has lost its contrast"


def test_jpeg_extended_12_bit_falls_back_to_gdcm(dicom_dir: Path) -> None:
    """pylibjpeg rejects this 12-bit JPEG Extended stream; GDCM must decode it."""
    extended = decode(pydicom.dcmread(dicom_dir / "rg2-hip-cr-jpegextended.dcm"))
    lossless = decode(pydicom.dcmread(dicom_dir / "rg2-hip-cr-jpeglossless.dcm"))
    assert extended.decoder == "gdcm"
    assert np.corrcoef(extended.pixels.ravel(), lossless.pixels.ravel())[0, 1] > 0.98


def test_monochrome1_is_inverted_for_display(dicom_dir: Path, rg1_uncr: pydicom.Dataset) -> None:
    """RG1 is MONOCHROME1: after decoding, the mediastinum must be brighter than the lungs."""
    image = decode(rg1_uncr).pixels
    rows, cols = image.shape
    mediastinum = image[rows // 3 : rows // 2, cols // 2 - cols // 20 : cols // 2 + cols // 20]
    lung = image[rows // 3 : rows // 2, cols // 5 : cols // 3]
    assert mediastinum.mean() > lung.mean() + 0.1


def test_compressed_copies_decode_like_the_uncompressed_original(
    dicom_dir: Path, rg1_uncr: pydicom.Dataset
) -> None:
    reference = decode(rg1_uncr).pixels.ravel()
    for name in ("rg1-chest-cr-mono1-j2k.dcm", "rg1-chest-cr-mono1-jpegls-near.dcm"):
        pixels = decode(pydicom.dcmread(dicom_dir / name)).pixels.ravel()
        assert np.corrcoef(reference, pixels)[0, 1] > 0.99, name


def test_spacing_prefers_pixel_spacing_and_ignores_zero(dicom_dir: Path) -> None:
    siim = decode(pydicom.dcmread(dicom_dir / "siim-cr-jpegbaseline.dcm"))
    assert siim.spacing_mm == (0.168, 0.168) and siim.spacing_source == "PixelSpacing"
    rg1 = decode(pydicom.dcmread(dicom_dir / "rg1-chest-cr-mono1-j2k.dcm"))
    assert rg1.spacing_mm is None  # its Pixel Spacing is 0\0: meaningless, not used


def test_truncated_pixel_data_is_a_decode_error_with_reason(rg1_uncr: pydicom.Dataset) -> None:
    ds = copy.deepcopy(rg1_uncr)
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
    with pytest.raises(DecodeError, match="cannot decode"):
        decode(ds)


def test_garbage_jpeg_stream_is_a_decode_error(dicom_dir: Path) -> None:
    from pydicom.encaps import encapsulate

    ds = pydicom.dcmread(dicom_dir / "siim-cr-jpegbaseline.dcm")
    ds.PixelData = encapsulate([b"\xff\xd8" + bytes(range(256)) * 8])
    with pytest.raises(DecodeError, match="cannot decode"):
        decode(ds)


def test_dataset_without_pixels_is_a_decode_error(dicom_dir: Path) -> None:
    with pytest.raises(DecodeError, match="no Pixel Data"):
        decode(pydicom.dcmread(dicom_dir / "example-tid1500-sr.dcm"))
