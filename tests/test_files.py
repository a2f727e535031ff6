"""Files without a Part-10 header are read the way dcmtk reads them; non-DICOM is an error."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from typer.testing import CliRunner

from dicom_node.cli import app
from dicom_node.files import NotDicomError, read_dicom_file

CHEST = "siim-cr-jpegbaseline.dcm"


def raw_copy(source: Path, target: Path, *, implicit: bool) -> Path:
    """The bare data set of ``source``: no preamble, no "DICM", no File Meta Information."""
    dataset = pydicom.dcmread(source)
    dataset.decompress(generate_instance_uid=False)
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, implicit
    write_dataset(buffer, dataset)
    target.write_bytes(buffer.getvalue())
    return target


@pytest.mark.parametrize("implicit", [True, False])
def test_a_raw_data_set_reads_with_its_transfer_syntax_and_pixels(
    data: Path, tmp_path: Path, implicit: bool
) -> None:
    path = raw_copy(data / CHEST, tmp_path / "raw.dcm", implicit=implicit)
    assert path.read_bytes()[128:132] != b"DICM"
    dataset = read_dicom_file(path)
    expected = "1.2.840.10008.1.2" if implicit else "1.2.840.10008.1.2.1"
    assert dataset.file_meta.TransferSyntaxUID == expected
    original = pydicom.dcmread(data / CHEST)
    assert dataset.SOPInstanceUID == original.SOPInstanceUID
    assert dataset.pixel_array.shape == original.pixel_array.shape


@pytest.mark.parametrize("content", [b"plain text, not DICOM", b"\x00" * 64, b""])
def test_something_that_is_not_dicom_is_an_error_with_its_reason(
    tmp_path: Path, content: bytes
) -> None:
    path = tmp_path / "notes.dcm"
    path.write_bytes(content)
    with pytest.raises(NotDicomError, match="not a DICOM file"):
        read_dicom_file(path)


def test_rules_test_routes_a_raw_data_set_and_explains_a_non_dicom_file(
    data: Path, tmp_path: Path
) -> None:
    raw = raw_copy(data / CHEST, tmp_path / "raw.dcm", implicit=True)
    junk = tmp_path / "junk.dcm"
    junk.write_text("not DICOM")
    result = CliRunner().invoke(app, ["rules", "test", "--json", str(raw), str(junk)])
    records = json.loads(result.stdout)
    assert records[0]["error"] is None and records[0]["pipeline"] == "cxr-cascade"
    assert records[1]["error"].startswith("not a DICOM file")
