"""Checks on a received dataset *before* we acknowledge it, without decoding pixels.

pydicom is deliberately forgiving: a dataset cut off in the middle of its Pixel Data,
or an element whose length runs past the end of the stream, still "reads" and simply
comes back shorter. A node that says "stored" must not accept such an object, because
the sender will then consider it delivered and may delete its copy. So the encoded
stream is walked element by element first (PS3.5 §7: explicit/implicit VR, both byte
orders, defined and undefined lengths, sequences, encapsulated Pixel Data), and only
then are the few header attributes we index read with pydicom, stopping before the
Pixel Data.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from typing import Any

from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
)

ITEM = 0xFFFEE000
ITEM_DELIMITER = 0xFFFEE00D
SEQUENCE_DELIMITER = 0xFFFEE0DD
PIXEL_DATA = 0x7FE00010
UNDEFINED_LENGTH = 0xFFFFFFFF
MAX_DEPTH = 32
MAX_INFLATED_BYTES = 2 * 1024**3
LONG_VRS = frozenset(
    {
        b"OB",
        b"OD",
        b"OF",
        b"OL",
        b"OV",
        b"OW",
        b"SQ",
        b"SV",
        b"UC",
        b"UN",
        b"UR",
        b"UT",
        b"UV",
    }
)

# Header values are read leniently: we index them, we do not police them.
pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE


class DatasetError(ValueError):
    """The encoded dataset is not a well-formed DICOM data set."""


@dataclass(frozen=True)
class InstanceHeader:
    """The attributes the node indexes (no patient demographics, see storage.models)."""

    sop_class_uid: str | None
    sop_instance_uid: str | None
    study_instance_uid: str | None
    series_instance_uid: str | None
    modality: str | None = None
    body_part_examined: str | None = None
    series_number: int | None = None
    instance_number: int | None = None
    view_position: str | None = None
    rows: int | None = None
    columns: int | None = None
    photometric_interpretation: str | None = None
    study_date: str | None = None
    accession_number: str | None = None
    bits_allocated: int | None = None
    samples_per_pixel: int | None = None
    number_of_frames: int | None = None

    @property
    def pixel_bytes(self) -> int:
        """Bytes the decoded Pixel Data takes, as the header declares it (0 if unknown):
        what a decoder would allocate, whatever the size of a compressed stream."""
        if not (self.rows and self.columns and self.bits_allocated):
            return 0
        samples, frames = self.samples_per_pixel or 1, self.number_of_frames or 1
        return (self.rows * self.columns * samples * frames * self.bits_allocated + 7) // 8


@dataclass
class _Structure:
    """What the walk learnt about the top-level Pixel Data element."""

    pixel_data_length: int | None = None
    pixel_data_encapsulated: bool = False


class _Walker:
    """Validates element framing; never looks at values except sequence contents."""

    def __init__(self, buffer: bytes, *, implicit: bool, little: bool) -> None:
        self.buffer = buffer
        self.implicit = implicit
        self.order = "<" if little else ">"
        self.structure = _Structure()

    def _u32(self, pos: int) -> int:
        value: int = struct.unpack_from(f"{self.order}I", self.buffer, pos)[0]
        return value

    def _tag(self, pos: int) -> int:
        group, element = struct.unpack_from(f"{self.order}HH", self.buffer, pos)
        return int(group) << 16 | int(element)

    def walk(self) -> _Structure:
        end = self.walk_dataset(0, len(self.buffer), depth=0, delimited=False)
        if end != len(self.buffer):
            raise DatasetError(f"trailing bytes after offset {end}")
        return self.structure

    def walk_dataset(self, pos: int, end: int, *, depth: int, delimited: bool) -> int:
        """Walk elements in ``[pos, end)``; if ``delimited``, stop at an item delimiter."""
        if depth > MAX_DEPTH:
            raise DatasetError("sequences nested too deeply")
        while pos < end:
            if end - pos < 8:
                raise DatasetError(f"truncated element header at offset {pos}")
            tag = self._tag(pos)
            if tag == ITEM_DELIMITER and delimited:
                return pos + 8
            if tag >> 16 == 0xFFFE:
                raise DatasetError(f"unexpected delimiter ({tag:08X}) at offset {pos}")
            pos = self._element(tag, pos, end, depth)
        if delimited:
            raise DatasetError("item without item delimiter (data set truncated)")
        return pos

    def _header(self, pos: int, end: int) -> tuple[int, bytes | None, int]:
        """Return (value offset, VR or None, length) of the element at ``pos``."""
        if self.implicit:
            return pos + 8, None, self._u32(pos + 4)
        vr = self.buffer[pos + 4 : pos + 6]
        if not (len(vr) == 2 and vr.isalpha() and vr.isupper()):
            raise DatasetError(f"invalid VR {vr!r} at offset {pos}")
        if vr in LONG_VRS:
            if end - pos < 12:
                raise DatasetError(f"truncated element header at offset {pos}")
            return pos + 12, vr, self._u32(pos + 8)
        length: int = struct.unpack_from(f"{self.order}H", self.buffer, pos + 6)[0]
        return pos + 8, vr, length

    def _element(self, tag: int, pos: int, end: int, depth: int) -> int:
        value_pos, vr, length = self._header(pos, end)
        if length == UNDEFINED_LENGTH:
            return self._undefined(tag, vr, value_pos, end, depth)
        if length > end - value_pos:
            raise DatasetError(
                f"element ({tag:08X}) length {length} runs past the end of the data set "
                f"({end - value_pos} bytes left)"
            )
        if vr == b"SQ":
            self._items(value_pos, value_pos + length, depth, delimited=False)
        if tag == PIXEL_DATA and depth == 0:
            self.structure.pixel_data_length = length
        return value_pos + length

    def _undefined(self, tag: int, vr: bytes | None, pos: int, end: int, depth: int) -> int:
        if tag == PIXEL_DATA and vr != b"SQ":
            if depth == 0:
                self.structure.pixel_data_encapsulated = True
            return self._fragments(pos, end)
        if vr == b"UN":  # PS3.5 §6.2.2: undefined-length UN is an implicit VR LE sequence
            nested = _Walker(self.buffer, implicit=True, little=True)
            return nested._items(pos, end, depth, delimited=True)
        if vr in (None, b"SQ"):
            return self._items(pos, end, depth, delimited=True)
        raise DatasetError(f"undefined length not allowed for VR {vr!r} ({tag:08X})")

    def _items(self, pos: int, end: int, depth: int, *, delimited: bool) -> int:
        while pos < end or delimited:
            if end - pos < 8:
                raise DatasetError("sequence without sequence delimiter (data set truncated)")
            tag, length = self._tag(pos), self._u32(pos + 4)
            if tag == SEQUENCE_DELIMITER and delimited:
                return pos + 8
            if tag != ITEM:
                raise DatasetError(f"expected a sequence item at offset {pos}, got {tag:08X}")
            pos += 8
            if length == UNDEFINED_LENGTH:
                pos = self.walk_dataset(pos, end, depth=depth + 1, delimited=True)
                continue
            if length > end - pos:
                raise DatasetError(f"sequence item at offset {pos - 8} runs past the end")
            self.walk_dataset(pos, pos + length, depth=depth + 1, delimited=False)
            pos += length
        return pos

    def _fragments(self, pos: int, end: int) -> int:
        """Encapsulated Pixel Data (PS3.5 A.4): offset table item, fragments, delimiter."""
        items = 0
        while True:
            if end - pos < 8:
                raise DatasetError("encapsulated Pixel Data truncated (no sequence delimiter)")
            tag, length = self._tag(pos), self._u32(pos + 4)
            if tag == SEQUENCE_DELIMITER:
                if items == 0:
                    raise DatasetError("encapsulated Pixel Data without Basic Offset Table item")
                return pos + 8
            if tag != ITEM or length == UNDEFINED_LENGTH:
                raise DatasetError(f"malformed Pixel Data fragment at offset {pos}")
            if length > end - pos - 8:
                raise DatasetError(f"Pixel Data fragment at offset {pos} runs past the end")
            pos += 8 + length
            items += 1


def _decode_params(transfer_syntax: UID) -> tuple[bool, bool]:
    """(implicit VR?, little endian?) of a transfer syntax."""
    return transfer_syntax == ImplicitVRLittleEndian, transfer_syntax != ExplicitVRBigEndian


def _inflate(data: bytes) -> bytes:
    """Inflate a Deflated Explicit VR Little Endian data set (raw deflate, PS3.5 A.5)."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        inflated = inflater.decompress(data, MAX_INFLATED_BYTES)
    except zlib.error as exc:
        raise DatasetError(f"deflate stream is corrupt: {exc}") from None
    if inflater.unconsumed_tail:
        raise DatasetError("deflated data set inflates to more than 2 GiB")
    if not inflater.eof:
        raise DatasetError("deflate stream is truncated")
    return inflated


def _stop_at_pixel_data(tag: BaseTag, vr: str | None, length: int) -> bool:
    return int(tag) >= PIXEL_DATA


def inspect_dataset(data: bytes, transfer_syntax: str) -> InstanceHeader:
    """Validate the framing of ``data`` and return its indexed header attributes.

    Raises :class:`DatasetError` for anything that is not a complete, well-formed data
    set in ``transfer_syntax``, including native Pixel Data shorter than the image
    attributes say it must be.
    """
    syntax = UID(transfer_syntax)
    if syntax == DeflatedExplicitVRLittleEndian:
        data = _inflate(data)
    implicit, little = _decode_params(syntax)
    if not data:
        raise DatasetError("empty data set")
    structure = _Walker(data, implicit=implicit, little=little).walk()
    try:
        dataset = read_dataset(io.BytesIO(data), implicit, little, stop_when=_stop_at_pixel_data)
    except Exception as exc:  # pydicom raises many types for malformed headers
        raise DatasetError(f"header cannot be parsed: {type(exc).__name__}") from None
    _check_pixel_data_length(dataset, structure)
    return _header_of(dataset)


def _check_pixel_data_length(dataset: Dataset, structure: _Structure) -> None:
    """Native Pixel Data must hold at least Rows × Columns × Samples × Bits × Frames."""
    if structure.pixel_data_encapsulated or structure.pixel_data_length is None:
        return
    rows, columns = _int(dataset, "Rows"), _int(dataset, "Columns")
    bits = _int(dataset, "BitsAllocated")
    samples = _int(dataset, "SamplesPerPixel") or 1
    frames = _int(dataset, "NumberOfFrames") or 1
    if not (rows and columns and bits):
        return
    expected = (rows * columns * samples * frames * bits + 7) // 8
    if structure.pixel_data_length < expected:
        raise DatasetError(
            f"Pixel Data has {structure.pixel_data_length} bytes, image attributes need {expected}"
        )


def _value(dataset: Dataset, keyword: str) -> Any:
    try:
        return dataset.get(keyword)
    except Exception:  # a malformed value must not stop us from storing the object
        return None


def _text(dataset: Dataset, keyword: str, limit: int) -> str | None:
    value = _value(dataset, keyword)
    if value is None:
        return None
    if isinstance(value, list | tuple):  # multi-valued (e.g. Image Type): first value
        value = value[0] if value else None
    text = str(value).strip().strip("\x00") if value is not None else ""
    return text[:limit] or None


def _int(dataset: Dataset, keyword: str) -> int | None:
    value = _value(dataset, keyword)
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _uid(dataset: Dataset, keyword: str) -> str | None:
    value = _value(dataset, keyword)
    text = str(value).strip().rstrip("\x00") if value is not None else ""
    return text or None


def _header_of(dataset: Dataset) -> InstanceHeader:
    return InstanceHeader(
        sop_class_uid=_uid(dataset, "SOPClassUID"),
        sop_instance_uid=_uid(dataset, "SOPInstanceUID"),
        study_instance_uid=_uid(dataset, "StudyInstanceUID"),
        series_instance_uid=_uid(dataset, "SeriesInstanceUID"),
        modality=_text(dataset, "Modality", 16),
        body_part_examined=_text(dataset, "BodyPartExamined", 64),
        series_number=_int(dataset, "SeriesNumber"),
        instance_number=_int(dataset, "InstanceNumber"),
        view_position=_text(dataset, "ViewPosition", 16),
        rows=_int(dataset, "Rows"),
        columns=_int(dataset, "Columns"),
        photometric_interpretation=_text(dataset, "PhotometricInterpretation", 16),
        study_date=_text(dataset, "StudyDate", 8),
        accession_number=_text(dataset, "AccessionNumber", 16),
        bits_allocated=_int(dataset, "BitsAllocated"),
        samples_per_pixel=_int(dataset, "SamplesPerPixel"),
        number_of_frames=_int(dataset, "NumberOfFrames"),
    )
