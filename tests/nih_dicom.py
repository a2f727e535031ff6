"""NIH ChestX-ray14 sample PNGs wrapped into realistic DX DICOM (For Presentation).

The shared ``nih-sample/labels.csv`` keeps the real age, sex and view of each image and
the original detector geometry; the wrapper uses them as a modality would: Patient's Age
as an Age String (``058Y``), Patient's Sex, View Position PA/AP, Body Part CHEST, and
Imager Pixel Spacing scaled to the 1024-pixel PNG (``orig_spacing · orig_width / 1024``).
Names and IDs are fake but valid (``NIH^P00000129``). Each image becomes its own patient,
study and series, with UIDs derived from the image name, so runs are reproducible.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)

UID_PREFIX = "1.2.826.0.1.3680043.8.498."  # pydicom's root, for derived test UIDs
PNG_SIDE = 1024


@dataclass(frozen=True)
class NihImage:
    """One row of ``labels.csv``."""

    path: Path
    findings: str
    patient: int
    age: int
    sex: str
    view: str
    orig_width: int
    orig_spacing: float

    @property
    def spacing(self) -> float:
        """Pixel spacing of the 1024-pixel PNG, mm."""
        return round(self.orig_spacing * self.orig_width / PNG_SIDE, 6)


def read_labels(folder: Path) -> list[NihImage]:
    with (folder / "labels.csv").open(newline="") as handle:
        return [
            NihImage(
                path=folder / row["image"],
                findings=row["findings"],
                patient=int(row["patient"]),
                age=int(row["age"]),
                sex=row["sex"],
                view=row["view"],
                orig_width=int(row["orig_width"]),
                orig_spacing=float(row["orig_spacing_x"]),
            )
            for row in csv.DictReader(handle)
        ]


def pick(images: list[NihImage], views: dict[str, int]) -> list[NihImage]:
    """The first images (by name) of each view, e.g. ``{"PA": 2, "AP": 2}``."""
    chosen: list[NihImage] = []
    for view, count in views.items():
        chosen += [i for i in sorted(images, key=lambda i: i.path.name) if i.view == view][:count]
    return chosen


def _uid(image: NihImage, what: str) -> str:
    return generate_uid(prefix=UID_PREFIX, entropy_srcs=[image.path.name, what])


def dx_dataset(image: NihImage, pixels: np.ndarray | None = None) -> Dataset:
    """A DX For Presentation image of ``image`` (``pixels`` override the PNG's, e.g. a
    16-bit upscaled version; spacing is then scaled accordingly)."""
    if pixels is None:
        pixels = np.asarray(Image.open(image.path).convert("L"), dtype=np.uint8)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = _uid(image, "instance")
    ds.StudyInstanceUID = _uid(image, "study")
    ds.SeriesInstanceUID = _uid(image, "series")
    _patient_and_study(ds, image)
    _series_and_equipment(ds, image)
    _pixels(ds, image, pixels)
    return ds


def _patient_and_study(ds: Dataset, image: NihImage) -> None:
    ds.PatientName = f"NIH^P{image.patient:08d}"
    ds.PatientID = f"NIH{image.patient:08d}"
    ds.PatientBirthDate = ""
    ds.PatientSex = image.sex if image.sex in ("M", "F") else "O"
    ds.PatientAge = f"{image.age:03d}Y"
    ds.StudyDate, ds.StudyTime = "20170101", "120000"
    ds.StudyID = f"S{image.patient}"
    ds.AccessionNumber = f"A{image.patient:08d}"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "XR CHEST"


def _series_and_equipment(ds: Dataset, image: NihImage) -> None:
    ds.Modality = "DX"
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = image.view
    ds.ImageLaterality = "U"  # unpaired: a frontal chest covers both sides
    ds.PatientOrientation = ["L", "F"]  # conventional chest display
    ds.Manufacturer = "NIH Clinical Center (test data)"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.BurnedInAnnotation = "NO"
    region = Dataset()
    region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning = "51185008", "SCT", "Chest"
    ds.AnatomicRegionSequence = [region]
    ds.DetectorType = "SCINTILLATOR"
    ds.PositionerType = ""
    ds.AcquisitionContextSequence = []


def _pixels(ds: Dataset, image: NihImage, pixels: np.ndarray) -> None:
    rows, columns = pixels.shape
    spacing = [  # (row, column) spacing of the 1024² PNG, resampled to rows × columns
        round(image.spacing * PNG_SIDE / rows, 6),
        round(image.spacing * PNG_SIDE / columns, 6),
    ]
    ds.ImagerPixelSpacing = spacing
    ds.PixelSpacing = spacing
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    bits = 8 if pixels.dtype == np.uint8 else 16
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
    ds.PixelRepresentation = 0
    ds.PixelIntensityRelationship, ds.PixelIntensityRelationshipSign = "LOG", 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
    ds.PresentationLUTShape = "IDENTITY"
    low, high = float(pixels.min()), float(pixels.max())
    ds.WindowCenter, ds.WindowWidth = round((low + high) / 2), max(1, round(high - low))
    ds.LossyImageCompression = "00"
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()


def write(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path
