"""Heart and lungs: segmentation masks in, measurements out (CTR, widths, areas).

The segmentation network (a MONAI UNet, bundle role ``segment``) gives three independent
sigmoid channels — heart, right lung, left lung — because on a projection radiograph the
heart shadow overlaps the lungs (up to half of the heart's area in the training masks).
Its working grid is a square: the training images were stretched to a square upstream,
so serving stretches too (the shared transform chain of :mod:`inference.preprocess`).
Horizontal extents and areas are converted back to the source's grid by the scale of
each axis, so the stretch does not bias any measurement.

The cardiothoracic ratio follows the training data's definition: the widest horizontal
extent of the heart over the widest horizontal extent across both lungs (column of the
leftmost to column of the rightmost pixel of each mask). "Right" and "left" are the
patient's: on a frontal radiograph displayed as usual, the right lung is on the image's
left.

Masks that cannot be a chest (no lung, one lung, lungs on the wrong sides, heart outside
the thorax) make every measurement *not assessed* with the reason, never a number.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

SEGMENT_SIZE = 256


@dataclass(frozen=True)
class Structure:
    """One segmented structure and its SNOMED CT code (segment property type)."""

    name: str
    code: str
    meaning: str


HEART = Structure("heart", "80891009", "Heart")
RIGHT_LUNG = Structure("right_lung", "3341006", "Right lung")
LEFT_LUNG = Structure("left_lung", "44029006", "Left lung")
STRUCTURES = (HEART, RIGHT_LUNG, LEFT_LUNG)  # channel order of the network's output

# Plausibility, as fractions of the image (the working grid is the whole field of view).
MIN_LUNG_AREA = 0.03
MAX_LUNG_AREA = 0.45
MIN_HEART_AREA = 0.01
HEART_MARGIN = 0.03  # the heart may reach this far (of the width) beyond the lungs' extent


@dataclass(frozen=True)
class Measurement:
    """A number the SR, the JSON and the dashboard report (UCUM unit)."""

    name: str
    code: str
    scheme: str
    meaning: str
    value: float
    unit: str  # UCUM: "1", "mm", "cm2"

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "code": self.code,
            "scheme": self.scheme,
            "meaning": self.meaning,
            "value": round(self.value, 4),
            "unit": self.unit,
        }


@dataclass(frozen=True)
class Line:
    """A horizontal width drawn on the overlay: row and column span (working grid)."""

    row: int
    col_start: int
    col_end: int


@dataclass
class Anatomy:
    """The masks on the working grid and what was measured from them."""

    masks: np.ndarray  # bool, 3 × S × S, channels as STRUCTURES
    status: str  # "assessed" | "not_assessed"
    reason: str = ""
    model_name: str = ""  # the segmentation bundle (SEG algorithm identification)
    model_version: str = ""
    source_shape: tuple[int, int] | None = None  # rows × columns of the image segmented
    ctr: float | None = None
    measurements: list[Measurement] = field(default_factory=list)
    heart_line: Line | None = None
    thorax_line: Line | None = None
    spacing_note: str = ""  # which spacing the mm figures come from, or why none

    @property
    def assessed(self) -> bool:
        return self.status == "assessed"

    def mask(self, structure: Structure) -> np.ndarray:
        return self.masks[STRUCTURES.index(structure)]

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "reason": self.reason or None,
            "ctr": None if self.ctr is None else round(self.ctr, 4),
            "spacing": self.spacing_note or None,
        }


# Codes of the measurements. No standard concept names the radiographic cardiothoracic
# ratio (LOINC 59076-0 "Cardiothoracic Area Ratio" in CID 12279 is a fetal-echo area
# ratio, not this diameter ratio), so the ratio has a private code; widths and areas are
# SNOMED CT "Width" / "Area", qualified by their finding site in the SR.
CTR = ("cardiothoracic_ratio", "CTR", "99CXRAI", "Cardiothoracic ratio")
HEART_WIDTH = ("heart_width", "103355008", "SCT", "Width")
THORAX_WIDTH = ("thoracic_width", "103355008", "SCT", "Width")
AREA = ("{}_area", "42798000", "SCT", "Area")


def postprocess(probabilities: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Binary masks: threshold, keep each structure's largest component, fill holes.

    ``probabilities`` is 3 × S × S (sigmoid outputs). Stray islands would otherwise widen
    the horizontal extents the ratio is made of.
    """
    masks = probabilities >= threshold
    for c in range(masks.shape[0]):
        labels, n = ndimage.label(masks[c])
        if n > 1:
            sizes = ndimage.sum_labels(masks[c], labels, index=range(1, n + 1))
            masks[c] = labels == (int(np.argmax(sizes)) + 1)
        masks[c] = ndimage.binary_fill_holes(masks[c])
    return masks


def extent(mask: np.ndarray) -> tuple[int, int] | None:
    """First and last column holding the mask (inclusive); None for an empty mask."""
    cols = np.flatnonzero(mask.any(axis=0))
    return (int(cols[0]), int(cols[-1])) if cols.size else None


def ctr_of(masks: np.ndarray) -> float | None:
    """The dataset's ratio: heart extent / extent across both lungs (None if undefined)."""
    heart, lungs = extent(masks[0]), extent(masks[1] | masks[2])
    if heart is None or lungs is None:
        return None
    return (heart[1] - heart[0] + 1) / (lungs[1] - lungs[0] + 1)


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice coefficient of two boolean masks (1.0 when both are empty)."""
    total = int(pred.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * int((pred & truth).sum()) / total


def lung_problem(masks: np.ndarray) -> str | None:
    """Why these masks hold no plausible pair of lung fields, or None when they do."""
    area = masks.reshape(3, -1).mean(axis=1)
    lungs_found = [s for s, a in zip(STRUCTURES[1:], area[1:], strict=True) if a >= MIN_LUNG_AREA]
    if not lungs_found:
        return "no lung field found"
    if len(lungs_found) == 1:
        return f"only one lung field found ({lungs_found[0].meaning.lower()})"
    if max(area[1:]) > MAX_LUNG_AREA:
        return "a lung field covers an implausible share of the image"
    if ndimage.center_of_mass(masks[1])[1] >= ndimage.center_of_mass(masks[2])[1]:
        return "lung fields on the wrong sides (image flipped left-right?)"
    return None


def heart_problem(masks: np.ndarray) -> str | None:
    """Why the heart mask is implausible next to a plausible pair of lungs, or None."""
    if masks[0].mean() < MIN_HEART_AREA:
        return "no heart shadow found"
    heart, lungs = extent(masks[0]), extent(masks[1] | masks[2])
    assert heart is not None and lungs is not None
    margin = HEART_MARGIN * masks.shape[2]
    right_col = ndimage.center_of_mass(masks[1])[1]
    left_col = ndimage.center_of_mass(masks[2])[1]
    heart_col = ndimage.center_of_mass(masks[0])[1]
    if (
        heart[0] < lungs[0] - margin
        or heart[1] > lungs[1] + margin
        or not right_col < heart_col < left_col + margin
    ):
        return "heart shadow outside the thorax"
    return None


def implausible(masks: np.ndarray) -> str | None:
    """Why these masks cannot be a frontal chest, or None when they can."""
    return lung_problem(masks) or heart_problem(masks)


def measure(
    masks: np.ndarray,
    source_shape: tuple[int, int],
    spacing_mm: tuple[float, float] | None = None,
    spacing_source: str | None = None,
) -> Anatomy:
    """Measurements of ``masks`` (working grid) for a source of ``source_shape`` rows ×
    columns, in mm and cm² when the source's pixel spacing (row, column) is known."""
    reason = implausible(masks)
    if reason is not None:
        return Anatomy(masks, "not_assessed", f"anatomy not measurable: {reason}")
    size_r, size_c = masks.shape[1:]
    scale_r, scale_c = source_shape[0] / size_r, source_shape[1] / size_c
    heart, lungs = extent(masks[0]), extent(masks[1] | masks[2])
    assert heart is not None and lungs is not None
    heart_px = (heart[1] - heart[0] + 1) * scale_c
    thorax_px = (lungs[1] - lungs[0] + 1) * scale_c
    ctr = heart_px / thorax_px
    measurements = [Measurement(*CTR, ctr, "1")]
    note = "no pixel spacing in the header: widths and areas not given in mm"
    if spacing_mm is not None:
        row_mm, col_mm = spacing_mm
        measurements += [
            Measurement(*HEART_WIDTH, heart_px * col_mm, "mm"),
            Measurement(*THORAX_WIDTH, thorax_px * col_mm, "mm"),
        ]
        pixel_cm2 = scale_r * scale_c * row_mm * col_mm / 100.0
        for s in (RIGHT_LUNG, LEFT_LUNG):
            name, code, scheme, meaning = AREA
            area = float(masks[STRUCTURES.index(s)].sum()) * pixel_cm2
            measurements.append(
                Measurement(name.format(s.name), code, scheme, meaning, area, "cm2")
            )
        note = (
            f"from {spacing_source or 'pixel spacing'}; a projection radiograph magnifies "
            "the chest (typically 5-15 % PA, more AP): sizes are at the detector, not the patient"
        )
    heart_row = int(round(ndimage.center_of_mass(masks[0])[0]))
    lung_rows = np.flatnonzero((masks[1] | masks[2])[:, lungs[0] : lungs[1] + 1].any(axis=1))
    thorax_row = _widest_row(masks[1] | masks[2], lung_rows)
    return Anatomy(
        masks,
        "assessed",
        ctr=ctr,
        measurements=measurements,
        heart_line=Line(heart_row, heart[0], heart[1]),
        thorax_line=Line(thorax_row, lungs[0], lungs[1]),
        spacing_note=note,
    )


def _widest_row(lungs: np.ndarray, rows: np.ndarray) -> int:
    """The row where the lungs span furthest: where the thoracic width line is drawn."""
    best, best_span = int(rows[0]), -1
    for r in rows:
        cols = np.flatnonzero(lungs[r])
        span = int(cols[-1] - cols[0]) if cols.size else -1
        if span > best_span:
            best, best_span = int(r), span
    return best


def outline(mask: np.ndarray) -> np.ndarray:
    """The boundary pixels of a mask (for drawing outlines on the overlay)."""
    return mask & ~ndimage.binary_erosion(mask)


def cam_share(cam: np.ndarray, region: np.ndarray) -> float | None:
    """Share of the Grad-CAM mass inside ``region`` (both resampled to the CAM's grid)."""
    total = float(cam.sum())
    if total <= 0:
        return None
    if region.shape != cam.shape:
        zoom = (cam.shape[0] / region.shape[0], cam.shape[1] / region.shape[1])
        region = ndimage.zoom(region.astype(np.float32), zoom, order=1) >= 0.5
    return float(cam[region].sum()) / total
