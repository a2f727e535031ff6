"""Studies made to order for the priority and worklist tests.

:func:`study_image` writes a copy of a shared chest radiograph into a new (or a given)
study, with the accession number and patient a test asks for; :class:`PlannedEngine`
scores each image with the probability and cascade stage planned for its SOP Instance
UID. Everything else — receive path, database, pipeline, SR writer — is the real thing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from inference.cascade import ImageResult
from tests.pipeline_support import FakeEngine
from tests.results_data import make_finding, make_result

CHEST = "siim-cr-jpegbaseline.dcm"
CONFIRM_THRESHOLD = 0.5  # the threshold make_finding reports


@dataclass(frozen=True)
class Image:
    path: Path
    study_instance_uid: str
    sop_instance_uid: str


def study_image(
    data: Path,
    out_dir: Path,
    *,
    accession: str,
    patient_name: str = "Test^Patient",
    patient_id: str = "PID-0",
    study_instance_uid: str | None = None,
) -> Image:
    """A copy of the shared chest image as a new image of ``study_instance_uid`` (or of a
    new study), with its own series and SOP Instance UIDs."""
    ds = pydicom.dcmread(data / CHEST)
    ds.StudyInstanceUID = study_instance_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.AccessionNumber = accession
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    path = out_dir / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return Image(path, str(ds.StudyInstanceUID), str(ds.SOPInstanceUID))


@dataclass
class PlannedEngine(FakeEngine):
    """Scores each image as planned: SOP Instance UID → (probability, stage).

    A confirm-stage finding is present at :data:`CONFIRM_THRESHOLD`; a screen-stage one
    never is (the confirm model did not run), as in the real cascade.
    """

    plan: dict[str, tuple[float, str]] = field(default_factory=dict)

    def _one(self, ds: Dataset) -> ImageResult:
        planned = self.plan.get(str(ds.SOPInstanceUID))
        if planned is None:
            return super()._one(ds)
        probability, stage = planned
        present = stage == "confirm" and probability >= CONFIRM_THRESHOLD
        finding = make_finding(present, stage, probability=probability)
        return make_result(ds, [finding])
