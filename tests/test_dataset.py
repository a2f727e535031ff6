"""The framing check that stands between a received stream and a "stored" answer."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pydicom.data
import pytest
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from dicom_node.dataset import DatasetError, inspect_dataset
from tests.support import dataset_bytes, transfer_syntax_of


def test_every_shared_file_passes(image_files: list[Path], sr_file: Path, rg1_uncr: Path) -> None:
    for path in [*image_files, sr_file, rg1_uncr]:
        header = inspect_dataset(dataset_bytes(path), transfer_syntax_of(path))
        assert header.sop_instance_uid and header.study_instance_uid, path.name


@pytest.mark.parametrize(
    "name",
    ["MR_small_bigendian.dcm", "image_dfl.dcm", "emri_small_RLE.dcm", "rtplan.dcm", "CT_small.dcm"],
)
def test_other_encodings_pass(name: str) -> None:
    path = Path(str(pydicom.data.get_testdata_file(name)))
    header = inspect_dataset(dataset_bytes(path), transfer_syntax_of(path))
    assert header.sop_instance_uid


def test_header_attributes(rg1_uncr: Path) -> None:
    header = inspect_dataset(dataset_bytes(rg1_uncr), ExplicitVRLittleEndian)
    assert header.modality == "CR"
    assert header.body_part_examined == "CHEST"
    assert (header.rows, header.columns) == (1955, 1841)
    assert header.photometric_interpretation == "MONOCHROME1"
    assert header.sop_class_uid == "1.2.840.10008.5.1.4.1.1.1"


@pytest.mark.parametrize("fraction", [0.999, 0.9, 0.5, 0.1])
def test_truncated_native_data_set_is_rejected(rg1_uncr: Path, fraction: float) -> None:
    data = dataset_bytes(rg1_uncr)
    with pytest.raises(DatasetError):
        inspect_dataset(data[: int(len(data) * fraction)], ExplicitVRLittleEndian)


def test_truncated_encapsulated_data_set_is_rejected(image_files: list[Path]) -> None:
    path = next(p for p in image_files if "j2k" in p.name)
    data = dataset_bytes(path)
    for cut in (len(data) - 4, len(data) - 1000, len(data) // 2):
        with pytest.raises(DatasetError):
            inspect_dataset(data[:cut], transfer_syntax_of(path))


def test_length_running_past_the_end_is_rejected(rg1_uncr: Path) -> None:
    data = bytearray(dataset_bytes(rg1_uncr))
    offset = data.index(b"\xe0\x7f\x10\x00OW")  # Pixel Data, explicit VR little endian
    length = struct.unpack_from("<I", data, offset + 8)[0]
    struct.pack_into("<I", data, offset + 8, length + 1_000_000)
    with pytest.raises(DatasetError, match="runs past the end"):
        inspect_dataset(bytes(data), ExplicitVRLittleEndian)


def test_pixel_data_shorter_than_image_is_rejected(rg1_uncr: Path) -> None:
    """A consistent but short Pixel Data (lengths patched to match) is still refused."""
    data = bytearray(dataset_bytes(rg1_uncr))
    offset = data.index(b"\xe0\x7f\x10\x00OW")
    struct.pack_into("<I", data, offset + 8, 1000)
    with pytest.raises(DatasetError, match="Pixel Data has 1000 bytes"):
        inspect_dataset(bytes(data[: offset + 12 + 1000]), ExplicitVRLittleEndian)


def test_garbage_is_rejected() -> None:
    for garbage in (b"", b"\x00" * 7, b"not a dicom data set at all", bytes(range(256)) * 8):
        with pytest.raises(DatasetError):
            inspect_dataset(garbage, ExplicitVRLittleEndian)


def test_implicit_little_endian_truncation(image_files: list[Path]) -> None:
    path = next(p for p in image_files if transfer_syntax_of(p) == ImplicitVRLittleEndian)
    data = dataset_bytes(path)
    inspect_dataset(data, ImplicitVRLittleEndian)
    with pytest.raises(DatasetError):
        inspect_dataset(data[:-10], ImplicitVRLittleEndian)


def test_big_endian_truncation() -> None:
    path = Path(str(pydicom.data.get_testdata_file("MR_small_bigendian.dcm")))
    data = dataset_bytes(path)
    with pytest.raises(DatasetError):
        inspect_dataset(data[:-10], ExplicitVRBigEndian)


def test_deflate_stream_must_be_complete_and_valid() -> None:
    path = Path(str(pydicom.data.get_testdata_file("image_dfl.dcm")))
    data = dataset_bytes(path)
    with pytest.raises(DatasetError, match="truncated"):
        inspect_dataset(data[: len(data) // 2], DeflatedExplicitVRLittleEndian)
    with pytest.raises(DatasetError, match="corrupt"):
        inspect_dataset(b"\xff" * 64, DeflatedExplicitVRLittleEndian)
    inflated = zlib.decompress(data, -zlib.MAX_WBITS)
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    short = compressor.compress(inflated[:-100]) + compressor.flush()
    with pytest.raises(DatasetError):
        inspect_dataset(short, DeflatedExplicitVRLittleEndian)


def test_undefined_length_sequence_without_delimiter(rg1_uncr: Path) -> None:
    seq = (
        b"\x08\x00\x40\x11SQ\x00\x00\xff\xff\xff\xff"  # (0008,1140) SQ, undefined length
        b"\xfe\xff\x00\xe0\xff\xff\xff\xff"  # item, undefined length
        b"\x08\x00\x50\x11UI\x04\x001.2\x00"
    )  # (0008,1150) UI "1.2" — then nothing
    with pytest.raises(DatasetError, match="truncated"):
        inspect_dataset(seq, ExplicitVRLittleEndian)
    complete = seq + b"\xfe\xff\x0d\xe0\x00\x00\x00\x00" + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    inspect_dataset(complete, ExplicitVRLittleEndian)
