"""A PNG thumbnail of a heatmap secondary capture, for the dashboard.

The SC in the spool is the object the archive received (RGB overlay with the burned-in
marking), so the thumbnail shows exactly what radiologists see in their viewer; nothing
is recomputed from the model.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image

DEFAULT_SIZE = 512


def render_png(path: Path, size: int = DEFAULT_SIZE) -> bytes:
    """The SC's pixels as PNG, scaled to fit ``size`` × ``size`` (never enlarged)."""
    dataset = pydicom.dcmread(path)
    pixels = np.asarray(dataset.pixel_array)
    if pixels.dtype != np.uint8:  # the node writes 8-bit RGB; be lenient with others
        span = float(pixels.max() - pixels.min()) or 1.0
        pixels = ((pixels - pixels.min()) * (255.0 / span)).astype(np.uint8)
    image = Image.fromarray(pixels)
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()
