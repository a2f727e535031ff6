"""Reading DICOM files from disk the way dcmtk and pydicom's force mode do.

Files on disk are not always PS3.10 files: exports and older systems write the bare data
set, with no 128-byte preamble, no ``DICM`` prefix and no File Meta Information. dcmtk
reads those (guessing the transfer syntax from the first element), and so does pydicom
with ``force=True``. Used by the offline commands (``analyze``, ``rules test``); the
network path never needs it — a C-STORE carries its transfer syntax in the association.

A file that is not DICOM at all is an error with its reason, never a silently empty
data set: pydicom's force mode "reads" anything, so a forced read is accepted only when
it parses to the end and names a SOP class or at least one identifying attribute.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

_IDENTIFYING = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "Modality")


class NotDicomError(ValueError):
    """The file is neither a PS3.10 file nor a readable raw data set."""


def read_dicom_file(path: Path, *, stop_before_pixels: bool = False) -> Dataset:
    """The data set in ``path``, with or without a Part-10 header.

    A raw data set gets File Meta Information with the transfer syntax it was read in,
    so that its pixel data can be decoded like any other file's.
    """
    try:
        return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError:
        pass  # no preamble / "DICM": try it as a raw data set
    try:
        dataset = pydicom.dcmread(path, force=True, stop_before_pixels=stop_before_pixels)
        for _ in dataset:  # force mode is lazy: make every element parse now
            pass
    except Exception as exc:
        raise NotDicomError(
            f"not a DICOM file: no Part-10 header, and not a readable raw data set "
            f"({type(exc).__name__}: {exc})"
        ) from None
    if not any(keyword in dataset for keyword in _IDENTIFYING):
        raise NotDicomError(
            "not a DICOM file: no Part-10 header, and no SOP Class, SOP Instance, Study "
            "Instance UID or Modality when read as a raw data set"
        )
    _add_file_meta(dataset)
    return dataset


def _add_file_meta(dataset: Dataset) -> None:
    implicit, little = dataset.original_encoding
    if implicit:
        syntax = ImplicitVRLittleEndian
    else:
        syntax = ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = syntax
    if "SOPClassUID" in dataset:
        meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    if "SOPInstanceUID" in dataset:
        meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    dataset.file_meta = meta
