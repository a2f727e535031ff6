"""DICOM pixel decoding into a display-ready greyscale image.

The networks are trained on 8-bit display images (what a radiologist sees), so serving must
reproduce the display pipeline of PS3.4 Annex N / PS3.3 C.11 before the shared MONAI
chain: decode → Modality LUT → VOI LUT (or window) → Presentation (MONOCHROME1 inverted).
The result is a float32 image in [0, 1] where brighter means more attenuation.
"""

from __future__ import annotations

import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.pixels.utils import _get_jpg_parameters  # SOF parser of the decoders we use

# Percentiles used when an image carries no VOI: avoids a few saturated pixels (collimator
# edges, burned-in markers) compressing the whole anatomy into a handful of grey levels.
AUTO_WINDOW_PERCENTILES = (0.5, 99.5)
GDCM_TIMEOUT_S = 120
# Most bytes a decoder may allocate for one image's pixels (all frames): 8 times a large
# 4k × 4k 16-bit radiograph. A small compressed stream can declare any size.
MAX_DECODED_BYTES = 1024**3
_ITEM_TAG = b"\xfe\xff\x00\xe0"
_J2K_SOC_SIZ = b"\xff\x4f\xff\x51"
_STREAM_HEADER_SCAN = 4096


class DecodeError(Exception):
    """The pixel data cannot be turned into an image; the message says why."""


@dataclass(frozen=True)
class DecodedImage:
    pixels: np.ndarray  # float32, H×W, [0, 1], MONOCHROME2 polarity
    spacing_mm: tuple[float, float] | None  # (row, column) spacing
    spacing_source: str | None  # "PixelSpacing" | "ImagerPixelSpacing"
    decoder: str  # which decoder produced the pixels


def decode(ds: Dataset, max_bytes: int = MAX_DECODED_BYTES) -> DecodedImage:
    """Decode ``ds`` to a display-ready image, or raise :class:`DecodeError`.

    Images whose header or compressed stream declares more than ``max_bytes`` of pixels
    are refused before any decoder runs (a decompression bomb is a few kilobytes).
    """
    if "PixelData" not in ds:
        raise DecodeError("no Pixel Data in the dataset")
    check_declared_size(ds, max_bytes)
    raw, decoder = _raw_pixels(ds)
    if raw.ndim == 3 and ds.get("SamplesPerPixel", 1) == 1:
        raw = raw[0]  # multi-frame: the first frame is the radiograph
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        return DecodedImage(_colour_to_grey(raw), *_spacing(ds), decoder)
    display = _display_values(ds, raw)
    if photometric == "MONOCHROME1":
        display = 1.0 - display
    return DecodedImage(display, *_spacing(ds), decoder)


def check_declared_size(ds: Dataset, max_bytes: int = MAX_DECODED_BYTES) -> None:
    """Raise :class:`DecodeError` if decoding ``ds`` would allocate more than ``max_bytes``.

    Both sizes a decoder may trust are checked: the image attributes (Rows × Columns ×
    Samples × Frames × Bits Allocated) and, for encapsulated data, the dimensions in the
    first fragment's JPEG SOF or JPEG 2000 SIZ marker, which can differ from them.
    """
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        samples, bits = int(ds.get("SamplesPerPixel") or 1), int(ds.BitsAllocated)
        frames = int(ds.get("NumberOfFrames") or 1)
    except (AttributeError, TypeError, ValueError):
        raise DecodeError("Rows, Columns or Bits Allocated missing or invalid") from None
    declared = rows * columns * samples * frames * max(bits, 8) // 8
    if declared > max_bytes:
        raise DecodeError(
            f"image declares {declared} bytes of pixels ({rows}x{columns}, {frames} frames), "
            f"more than {max_bytes}"
        )
    shape = _stream_shape(_first_fragment(ds)) if _is_encapsulated(ds) else None
    if shape is not None:
        height, width, components = shape
        streamed = height * width * components * 2 * frames  # ≤ 16 bits per sample
        if streamed > max_bytes:
            raise DecodeError(
                f"compressed stream declares {height}x{width}x{components} "
                f"({streamed} bytes of pixels), more than {max_bytes}"
            )


def _is_encapsulated(ds: Dataset) -> bool:
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    return bool(syntax is not None and syntax.is_encapsulated)


def _first_fragment(ds: Dataset) -> bytes:
    """The start of the first fragment after the Basic Offset Table (PS3.5 A.4)."""
    data = bytes(ds.PixelData[: 1 << 20])
    pos = 0
    for index in range(2):  # the Basic Offset Table item, then the first fragment
        if data[pos : pos + 4] != _ITEM_TAG or len(data) < pos + 8:
            return b""
        length = int.from_bytes(data[pos + 4 : pos + 8], "little")
        if index == 1:
            return data[pos + 8 : pos + 8 + min(length, _STREAM_HEADER_SCAN)]
        pos += 8 + length
    return b""


def _stream_shape(fragment: bytes) -> tuple[int, int, int] | None:
    """(height, width, components) from a JPEG/JPEG-LS SOF or a JPEG 2000 SIZ marker."""
    if fragment.startswith(b"\xff\xd8"):
        params = _get_jpg_parameters(fragment)
        if "height" in params:
            return int(params["height"]), int(params["width"]), int(params["components"])
        return None
    at = fragment.find(_J2K_SOC_SIZ, 0, _STREAM_HEADER_SCAN)  # raw codestream or JP2 box
    if at < 0 or len(fragment) < at + 42:
        return None
    x_size, y_size, x_origin, y_origin = struct.unpack_from(">IIII", fragment, at + 8)
    (components,) = struct.unpack_from(">H", fragment, at + 40)
    return max(0, y_size - y_origin), max(0, x_size - x_origin), components


def _raw_pixels(ds: Dataset) -> tuple[np.ndarray, str]:
    """Stored values through pydicom's plugins, then GDCM called directly.

    pydicom refuses some streams up front (e.g. 12-bit JPEG Extended, which neither
    pylibjpeg nor pydicom's GDCM wrapper accepts); GDCM's own reader handles many of them.
    """
    errors: list[str] = []
    try:
        return ds.pixel_array, "pydicom"
    except Exception as exc:  # noqa: BLE001 - every plugin failure is reported as a reason
        errors.append(f"pydicom: {_first_line(exc)}")
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if syntax is None or not syntax.is_compressed:
        # Native pixel data that pydicom cannot read is damaged; GDCM would zero-fill it.
        raise DecodeError("cannot decode pixel data (" + "; ".join(errors) + ")")
    try:
        return _gdcm_pixels(ds), "gdcm"
    except Exception as exc:  # noqa: BLE001
        errors.append(f"gdcm: {_first_line(exc)}")
    raise DecodeError("cannot decode pixel data (" + "; ".join(errors) + ")")


def _first_line(exc: Exception) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())[:200]


def _gdcm_pixels(ds: Dataset) -> np.ndarray:
    """Decode with GDCM's own ImageReader, in a child process.

    GDCM aborts the whole process on some malformed streams (a C++ assertion, not an
    exception), so it never runs inside the node's process: a crash is a decode error.
    """
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.dcm", Path(tmp) / "out.npy"
        ds.save_as(src, enforce_file_format=True)
        proc = subprocess.run(
            [sys.executable, "-m", "inference.decode", str(src), str(dst)],
            capture_output=True,
            text=True,
            timeout=GDCM_TIMEOUT_S,
            check=False,
        )
        if proc.returncode != 0 or not dst.is_file():
            detail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
            raise DecodeError(f"GDCM failed: {detail}")
        pixels: np.ndarray = np.load(dst)
    rows, cols = int(ds.Rows), int(ds.Columns)
    samples = int(ds.get("SamplesPerPixel", 1))
    shape = (rows, cols, samples) if samples > 1 else (rows, cols)
    if pixels.size < int(np.prod(shape)):
        raise DecodeError("GDCM returned fewer pixels than Rows × Columns")
    return pixels[: int(np.prod(shape))].reshape(shape)


def _gdcm_decode_file(src: str, dst: str) -> None:
    """Child-process entry point: decode ``src`` with GDCM, save the raw values to ``dst``."""
    import gdcm

    reader = gdcm.ImageReader()
    reader.SetFileName(src)
    if not reader.Read():
        sys.exit("GDCM could not read the file")
    image = reader.GetImage()
    buffer = image.GetBuffer()
    if not buffer:
        sys.exit("GDCM returned no pixels")
    dtypes = {
        gdcm.PixelFormat.UINT8: np.uint8,
        gdcm.PixelFormat.INT8: np.int8,
        gdcm.PixelFormat.UINT16: np.uint16,
        gdcm.PixelFormat.INT16: np.int16,
    }
    fmt = image.GetPixelFormat()
    if fmt.GetScalarType() not in dtypes:
        sys.exit(f"GDCM pixel format {fmt.GetScalarTypeAsString()} not supported")
    # python-gdcm hands the bytes over as a str with surrogate escapes.
    raw = buffer.encode("utf-8", "surrogateescape")
    np.save(dst, np.frombuffer(raw, dtype=dtypes[fmt.GetScalarType()]))


def _display_values(ds: Dataset, raw: np.ndarray) -> np.ndarray:
    """Modality LUT, then the dataset's VOI (LUT or window), else a percentile window."""
    values = np.asarray(apply_modality_lut(raw, ds), dtype=np.float32)
    if "VOILUTSequence" in ds or "WindowCenter" in ds:
        try:
            windowed = np.asarray(apply_voi_lut(values, ds, prefer_lut=True), dtype=np.float32)
            return _stretch(windowed, float(windowed.min()), float(windowed.max()))
        except (ValueError, TypeError, IndexError):
            pass  # malformed VOI attributes: fall back to the automatic window
    sample = values[:: max(1, values.shape[0] // 512), :: max(1, values.shape[1] // 512)]
    low, high = np.percentile(sample, AUTO_WINDOW_PERCENTILES)
    return _stretch(values, float(low), float(high))


def _stretch(values: np.ndarray, low: float, high: float) -> np.ndarray:
    if high <= low:
        return np.zeros(values.shape, dtype=np.float32)
    out = (values - np.float32(low)) * np.float32(1.0 / (high - low))
    return np.clip(out, 0.0, 1.0, out=out)


def _colour_to_grey(raw: np.ndarray) -> np.ndarray:
    """Secondary captures sometimes arrive as RGB: use luminance (ITU-R BT.601)."""
    rgb = raw.astype(np.float32)
    grey = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    return _stretch(grey, 0.0, 255.0 if raw.dtype == np.uint8 else float(grey.max()))


def _spacing(ds: Dataset) -> tuple[tuple[float, float] | None, str | None]:
    """Pixel Spacing if it is meaningful, else Imager Pixel Spacing (PS3.3 C.8.11.4)."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        try:
            row, col = (float(v) for v in value)
        except (TypeError, ValueError):
            continue
        if row > 0 and col > 0:
            return (row, col), keyword
    return None, None


if __name__ == "__main__":
    _gdcm_decode_file(sys.argv[1], sys.argv[2])
