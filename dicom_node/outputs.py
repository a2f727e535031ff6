"""Write outputs: the objects of the rule's output types for one image, durable in the spool.

The builders live in :mod:`dicom_node.results`, one module per output type, found through
:mod:`dicom_node.results.registry`; this step builds the types a rule asks for, encodes
them as PS3.10 files and writes them to ``spool/outputs/`` with the spool's
tmp → fsync → rename discipline, *before* the worker's transaction records them and
queues their sends. A crash in between leaves at worst an output file that the re-run
job overwrites with the same SOP Instance UID — never a second object for the image.

The re-run's object is byte-identical, not merely of the same UID: every timestamp in it
is pinned to the job's own moment (:func:`pin_timestamps`), because a PACS that already
stored the first one must not be handed a different object under the same UID
(PS3.3 C.12.1.1.1), and a dump of the two must not make anyone wonder which is right.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from dataclasses import dataclass
from io import BytesIO

from pydicom.dataset import Dataset
from pydicom.valuerep import DA, DT, TM

from dicom_node.results.registry import BuildInputs, OutputType
from storage.spool import Spool


@dataclass(frozen=True)
class Output:
    """One written output object."""

    kind: str  # its output type's name ("sr", "sc" …)
    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    relpath: str  # in the spool
    size: int


def build_outputs(types: Sequence[OutputType], inputs: BuildInputs) -> list[tuple[str, Dataset]]:
    """The objects of ``types`` that apply to the result, as ``(type name, dataset)``.

    A type whose needs the result does not meet (no overlay for the heatmap SC) is left
    out, not an error.
    """
    made = [
        (output_type.name, output_type.build(inputs))
        for output_type in types
        if output_type.applies_to(inputs.result)
    ]
    for _, dataset in made:
        pin_timestamps(dataset, inputs.content_datetime)
    return made


def pin_timestamps(dataset: Dataset, moment: datetime.datetime) -> None:
    """Instance creation and highdicom's contribution time → ``moment`` (was: now).

    These are the only values the builders take from the clock; with them pinned, the
    same inputs give the same bytes.
    """
    dataset.InstanceCreationDate = DA(moment.date())
    dataset.InstanceCreationTime = TM(moment.time())
    for item in dataset.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = DT(moment)


def encode(dataset: Dataset) -> bytes:
    """PS3.10 file bytes (preamble, File Meta Information, data set)."""
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def write_outputs(spool: Spool, made: list[tuple[str, Dataset]]) -> list[Output]:
    """Write every object durably; the file name is its SOP Instance UID."""
    written: list[Output] = []
    for kind, dataset in made:
        data = encode(dataset)
        uid = str(dataset.SOPInstanceUID)
        relpath = spool.store_output(kind, uid, [data])
        written.append(
            Output(
                kind=kind,
                sop_class_uid=str(dataset.SOPClassUID),
                sop_instance_uid=uid,
                study_instance_uid=str(dataset.StudyInstanceUID),
                relpath=relpath,
                size=len(data),
            )
        )
    return written
