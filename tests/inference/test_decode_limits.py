"""Decompression bombs: a few kilobytes that declare gigabytes are refused before decoding.

The streams are real JPEG / JPEG-LS / JPEG 2000 codestreams (pydicom's test files) whose
declared dimensions are rewritten, in the DICOM header and/or in the codestream's own
SOF or SIZ marker. The refusal must come without the allocation: the peak of traced
memory (numpy allocations are traced) stays far below what decoding would need.
"""

from __future__ import annotations

import struct
import tracemalloc
from collections.abc import Callable

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from inference.decode import DecodeError, check_declared_size, decode

BOMB_SIDE = 60000
MIB = 1024 * 1024


def load(name: str) -> Dataset:
    path = get_testdata_file(name)
    assert path is not None, f"pydicom test file {name} missing"
    return pydicom.dcmread(str(path))


def rewrite_stream(ds: Dataset, patch: Callable[[bytearray], None]) -> None:
    """Apply ``patch`` to the encapsulated Pixel Data (lengths unchanged)."""
    data = bytearray(ds.PixelData)
    patch(data)
    ds.PixelData = bytes(data)


def jpeg_sof(data: bytearray) -> None:
    """Set the height and width of the first SOF (JPEG and JPEG-LS) to 60000."""
    for offset in range(len(data) - 9):
        if data[offset] == 0xFF and data[offset + 1] in (0xC0, 0xC1, 0xC2, 0xC3, 0xF7):
            struct.pack_into(">HH", data, offset + 5, BOMB_SIDE, BOMB_SIDE)
            return
    raise AssertionError("no SOF marker")


def j2k_siz(data: bytearray) -> None:
    at = bytes(data).find(b"\xff\x4f\xff\x51")
    assert at >= 0, "no SIZ marker"
    struct.pack_into(">II", data, at + 8, BOMB_SIDE, BOMB_SIDE)


def refused_cheaply(ds: Dataset) -> str:
    tracemalloc.start()
    try:
        with pytest.raises(DecodeError) as info:
            decode(ds)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 * MIB, f"{peak / MIB:.0f} MiB allocated before refusing"
    return str(info.value)


@pytest.mark.parametrize(
    "name", ["SC_rgb_jpeg_dcmtk.dcm", "MR_small_jpeg_ls_lossless.dcm", "JPEG2000.dcm"]
)
def test_header_declaring_gigabytes_is_refused(name: str) -> None:
    ds = load(name)
    ds.Rows = ds.Columns = BOMB_SIDE
    message = refused_cheaply(ds)
    assert f"{BOMB_SIDE}x{BOMB_SIDE}" in message and "more than" in message


@pytest.mark.parametrize(
    ("name", "patch"),
    [
        ("SC_rgb_jpeg_dcmtk.dcm", jpeg_sof),
        ("MR_small_jpeg_ls_lossless.dcm", jpeg_sof),
        ("JPEG2000.dcm", j2k_siz),
    ],
)
def test_stream_declaring_more_than_its_header_is_refused(
    name: str, patch: Callable[[bytearray], None]
) -> None:
    """The header looks harmless; the codestream a decoder trusts does not."""
    ds = load(name)
    rewrite_stream(ds, patch)
    message = refused_cheaply(ds)
    assert "compressed stream declares 60000x60000" in message


@pytest.mark.parametrize(
    "name", ["SC_rgb_jpeg_dcmtk.dcm", "MR_small_jpeg_ls_lossless.dcm", "JPEG2000.dcm"]
)
def test_ordinary_streams_pass_the_check(name: str) -> None:
    ds = load(name)
    check_declared_size(ds)
    assert decode(ds).pixels.shape == (ds.Rows, ds.Columns)


def test_limit_is_a_parameter() -> None:
    ds = load("SC_rgb_jpeg_dcmtk.dcm")  # 100 x 100 RGB: 30,000 bytes
    with pytest.raises(DecodeError, match="more than 20000"):
        decode(ds, max_bytes=20_000)
