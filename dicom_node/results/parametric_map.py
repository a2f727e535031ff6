"""Where the model looked, as numbers a viewer can overlay: a Parametric Map (PS3.3 A.75).

Where the heatmap SC (:mod:`dicom_node.results.heatmap_sc`) is a picture — colours
burned into a reduced copy of the radiograph — this is the Grad-CAM map itself, on the
source's own grid (``ImageResult.heatmap``: the network-grid map resampled onto the
source's rows × columns), so that a viewer that knows IHE AI Results can lay it over the
radiograph pixel for pixel, colour it, window it and read a value under the cursor. It
is off by default: a rule asks for it with ``outputs = ["sr", "sc", "pm"]``.

Encoding (built with highdicom's ``ParametricMap``):

* **Stored values** 16-bit unsigned, 0-65535 for activations 0-1. Not float: a Palette
  Color LUT (Pixel Presentation COLOR_RANGE) is only defined for integer pixel data, and
  without one a viewer shows the map in grey. 16 bits keep 1/65535 steps, far finer than
  the map's own resolution (the network's input grid). Size: rows × columns × 2 bytes,
  e.g. 10 MB for a 2500 × 2048 flat-panel image (20 MB as float32), uncompressed, since
  a map shared per pixel with its source is what the profile's viewers expect.
* **Real World Value Mapping**: value = stored / 65535, unit (1, UCUM, "no units"),
  quantity (130403, DCM, "Gradient-weighted class activation") of CID 7180 — a standard
  concept, so no private code; it is not a probability (the SR carries that), only where
  the network's evidence for the finding was strongest, normalised to 0-1.
* **Colour**: a 256-entry, 16-bit Palette Color LUT with the SC's colour scale
  (:data:`inference.explain.COLORMAP`, blue → red) over the full stored range (Stored
  Value Color Range 0-65535), with highdicom's sRGB ICC profile; VOI window 0-65535.
* **Geometry**: the Parametric Map IOD requires a Frame of Reference and the Pixel
  Measures, Plane Position and Plane Orientation (Patient) functional groups, which a
  projection radiograph (CR, DX, SC) does not have. The map gets a Frame of Reference of
  its own (UID derived from the source instance; no Position Reference Indicator), one
  plane at the origin, oriented as the source's Patient Orientation says (row and
  column directions; the frontal-chest display convention L, F when the source does not
  say — the input gate accepts only frontal chest images), with the source's Pixel
  Spacing, else its Imager Pixel Spacing, else a nominal 1 mm. These values only
  satisfy the IOD: the map is tied to its source by the Source Image and Derivation
  Image references with Spatial Locations Preserved YES on the identical pixel grid,
  and it is not for measuring.
* Modality ``OT`` (as the heatmap SC, never routed back as CR or DX), Body Part Examined
  CHEST, Content Qualification RESEARCH, the study of the source, a series of its own
  and deterministic UIDs (:mod:`dicom_node.results.uids`, kind ``"pm"``), the model as
  Contributing Equipment as in the SR and the SC.
"""

from __future__ import annotations

import datetime
import pkgutil
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from highdicom.pm import ParametricMap, RealWorldValueMapping
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import UID, ParametricMapStorage

from dicom_node.results.common import (
    Algorithm,
    Equipment,
    algorithm_equipment,
    instance_number,
    pin_dimension_organization,
    source_header,
    without_person_names,
)
from dicom_node.results.registry import BuildInputs, OutputType, register
from dicom_node.results.uids import derived_uid, model_identities, result_uids
from inference.cascade import Finding, ImageResult
from inference.explain import COLORMAP

PM_SERIES_NUMBER = 9903
PM_SERIES_DESCRIPTION = "AI CXR heatmap (parametric map)"
PM_MODALITY = "OT"
CHEST = "CHEST"
CONTENT_LABEL = "GRADCAM"
MAX_STORED = 65535  # 16-bit unsigned stored values ↔ activation 0-1
NOMINAL_SPACING_MM = 1.0
# Row and column directions of a frontal chest radiograph as displayed (PS3.3 C.7.6.1.1.1).
FRONTAL_CHEST_ORIENTATION = ("L", "F")
# Patient Orientation letters → unit vectors of the patient coordinate system (LPS).
_DIRECTIONS: dict[str, tuple[float, float, float]] = {
    "L": (1.0, 0.0, 0.0),
    "R": (-1.0, 0.0, 0.0),
    "P": (0.0, 1.0, 0.0),
    "A": (0.0, -1.0, 0.0),
    "H": (0.0, 0.0, 1.0),
    "F": (0.0, 0.0, -1.0),
}
_SRGB_PROFILE = "_icc_profiles/sRGB_v4_ICC_preference.icc"  # shipped with highdicom


def heatmap_parametric_map(
    source: Dataset,
    result: ImageResult,
    *,
    equipment: Equipment | None = None,
    series_number: int = PM_SERIES_NUMBER,
    series_description: str = PM_SERIES_DESCRIPTION,
    content_datetime: datetime.datetime | None = None,
    source_variant: str | None = None,
    palette: bool = True,
) -> ParametricMap:
    """The Grad-CAM map of ``result`` as a Parametric Map in the study of ``source``.

    ``palette=False`` writes a grey map (Pixel Presentation MONOCHROME, no palette, no
    colour range, no ICC profile) for a receiver that cannot take COLOR_RANGE.

    Raises ``ValueError`` when the result has no Grad-CAM map or finding, when the map is
    not on the source's grid, or when the result belongs to another image.
    """
    heatmap = _check_heatmap(source, result)
    finding = result.explained_finding or result.findings[0]
    equipment = equipment or Equipment()
    header = source_header(source)
    uids = result_uids(header, "pm", model_identities(result.findings), source_variant)
    moment = content_datetime or datetime.datetime.now()
    pm = ParametricMap(
        source_images=[_with_geometry(header)],
        pixel_array=stored_values(heatmap),
        series_instance_uid=uids.series_instance_uid,
        series_number=series_number,
        sop_instance_uid=uids.sop_instance_uid,
        instance_number=instance_number(header),
        manufacturer=equipment.manufacturer,
        manufacturer_model_name=equipment.model_name,
        software_versions=equipment.software_versions,
        # Type 1 in the Enhanced General Equipment module: the installation's device UID
        # stands in when no serial number is configured.
        device_serial_number=equipment.device_serial_number or str(equipment.device_uid),
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[_value_mapping(finding)],
        voi_lut_transformations=[
            hd.VOILUTTransformation(
                window_center=(MAX_STORED + 1) / 2,
                window_width=MAX_STORED + 1,
                window_explanation="Full activation range",
            )
        ],
        content_label=CONTENT_LABEL,
        content_description=f"Grad-CAM {finding.label.meaning}"[:64],
        pixel_measures=hd.PixelMeasuresSequence(_pixel_spacing(header), None),
        palette_color_lut_transformation=_palette() if palette else None,
        icc_profile=_srgb_profile() if palette else None,
        contributing_equipment=algorithm_equipment(
            [Algorithm.of(finding)], equipment, moment, "Grad-CAM heatmap"
        ),
        series_description=series_description,
        institution_name=equipment.institution_name,
        institutional_department_name=equipment.institutional_department_name,
        content_date=moment.date(),
        content_time=moment.time(),
    )
    # Names and the other patient/study attributes go in by copy (see common.py).
    pm.copy_patient_and_study_information(header)
    _complete(pm, finding, palette)
    return pm


def stored_values(heatmap: np.ndarray) -> np.ndarray:
    """Activations 0-1 → uint16 0-65535 (rounded; values outside 0-1 are clipped)."""
    clipped = np.clip(np.nan_to_num(heatmap.astype(np.float64), nan=0.0), 0.0, 1.0)
    return np.round(clipped * MAX_STORED).astype(np.uint16)


def _check_heatmap(source: Dataset, result: ImageResult) -> np.ndarray:
    if result.cam is None or not result.findings:
        raise ValueError("no parametric map for a result without Grad-CAM map or finding")
    if result.sop_instance_uid and result.sop_instance_uid != source.SOPInstanceUID:
        raise ValueError(
            f"result belongs to {result.sop_instance_uid}, not to {source.SOPInstanceUID}"
        )
    heatmap = result.heatmap
    grid = (int(source.Rows), int(source.Columns))
    if heatmap is None or heatmap.shape != grid:
        shape = None if heatmap is None else heatmap.shape
        raise ValueError(f"heatmap grid {shape} is not the source's {grid}")
    return heatmap


def _value_mapping(finding: Finding) -> RealWorldValueMapping:
    return RealWorldValueMapping(
        lut_label=CONTENT_LABEL,
        lut_explanation=(
            f"Grad-CAM activation for {finding.label.meaning} "
            f"({finding.model_name} {finding.model_version}), 0-1"
        )[:64],
        unit=codes.UCUM.NoUnits,
        value_range=(0, MAX_STORED),
        slope=1.0 / MAX_STORED,
        intercept=0.0,
        quantity_definition=codes.DCM.GradientWeightedClassActivation,
    )


def _palette() -> hd.PaletteColorLUTTransformation:
    """The SC's colour scale as a 256-entry, 16-bit palette."""
    lut = COLORMAP.astype(np.uint16) * 257  # 0-255 → 0-65535
    return hd.PaletteColorLUTTransformation(
        red_lut=hd.PaletteColorLUT(0, lut[:, 0], "red"),
        green_lut=hd.PaletteColorLUT(0, lut[:, 1], "green"),
        blue_lut=hd.PaletteColorLUT(0, lut[:, 2], "blue"),
    )


def _srgb_profile() -> bytes:
    profile = pkgutil.get_data("highdicom", _SRGB_PROFILE)
    if profile is None:  # pragma: no cover - a broken highdicom installation
        raise RuntimeError("highdicom's sRGB ICC profile is missing")
    return profile


def _with_geometry(header: Dataset) -> Dataset:
    """The source header as highdicom's source image, with the plane the IOD requires.

    Person names are blanked (highdicom would echo a suspicious one in a warning); the
    copy only tells highdicom where the map lies, and is not written anywhere.
    """
    geometry = without_person_names(header)
    geometry.FrameOfReferenceUID = frame_of_reference_uid(header)
    geometry.PositionReferenceIndicator = None
    geometry.ImagePositionPatient = [0.0, 0.0, 0.0]
    geometry.ImageOrientationPatient = list(orientation(header.get("PatientOrientation")))
    geometry.PixelSpacing = list(_pixel_spacing(header))
    # Read by highdicom for a single-frame source; not written (Pixel Measures is given).
    geometry.SliceThickness = NOMINAL_SPACING_MM
    return geometry


def frame_of_reference_uid(header: Dataset) -> UID:
    """The map's own Frame of Reference: one per source image (each projection is its
    own plane), the same on every re-run."""
    return derived_uid("frame-of-reference", str(header.SOPInstanceUID))


def orientation(patient_orientation: Sequence[str] | None) -> tuple[float, ...]:
    """Image Orientation (Patient) from Patient Orientation's row and column directions.

    Only single-letter, perpendicular directions are taken as they are; anything else
    (absent, empty, oblique such as ``FL``) gets the frontal chest convention L, F.
    """
    letters = tuple(str(v).strip().upper() for v in patient_orientation or ())
    if (
        len(letters) == 2
        and all(letter in _DIRECTIONS for letter in letters)
        and np.dot(_DIRECTIONS[letters[0]], _DIRECTIONS[letters[1]]) == 0
    ):
        row, column = letters
    else:
        row, column = FRONTAL_CHEST_ORIENTATION
    return (*_DIRECTIONS[row], *_DIRECTIONS[column])


def _pixel_spacing(header: Dataset) -> tuple[float, float]:
    """Pixel Spacing if positive, else Imager Pixel Spacing, else a nominal 1 mm."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = header.get(keyword)
        if value is not None and len(value) == 2 and all(float(v) > 0 for v in value):
            return float(value[0]), float(value[1])
    return NOMINAL_SPACING_MM, NOMINAL_SPACING_MM


def _complete(pm: ParametricMap, finding: Finding, palette: bool) -> None:
    """What highdicom leaves to the caller: the colour range, the body part, stable UIDs.

    * Stored Value Color Range (PS3.3 C.7.6.16.2.x, required with COLOR_RANGE): the whole
      stored range spreads over the palette.
    * Body Part Examined CHEST, Laterality absent (General Series 2C, as the SC).
    * The Dimension Organization UID, which highdicom draws at random, derived from the
      map's instance UID, so that a re-run gives the same bytes.
    """
    if palette:
        color_range = Dataset()
        color_range.MinimumStoredValueMapped = 0.0
        color_range.MaximumStoredValueMapped = float(MAX_STORED)
        pm.SharedFunctionalGroupsSequence[0].StoredValueColorRangeSequence = [color_range]
    pm.Modality = PM_MODALITY
    pm.BodyPartExamined = CHEST
    pin_dimension_organization(pm)
    pm.DerivationDescription = (
        f"Grad-CAM of {finding.model_name} {finding.model_version} ({finding.stage} stage, "
        f"{finding.label.meaning}) resampled onto the source grid"
    )[:1024]


def _build(inputs: BuildInputs) -> Dataset:
    return heatmap_parametric_map(
        inputs.source,
        inputs.result,
        equipment=inputs.equipment,
        content_datetime=inputs.content_datetime,
        source_variant=inputs.source_variant,
    )


PM = register(
    OutputType(
        name="pm",
        sop_class_uid=ParametricMapStorage,
        build=_build,
        needs=frozenset({"cam"}),
        description="Parametric Map of the Grad-CAM activation on the source grid",
    )
)
