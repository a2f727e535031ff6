"""The analyzer: the inference models as the worker sees them: load once, name, warm up.

The worker needs three things from :mod:`inference`: results for a batch of data sets,
a stable *identity* of the models in force (the key of the ``results`` row, so a re-run
updates rather than duplicates), and a first call that is not slow. :class:`Analyzer` is
that contract; :class:`CascadeAnalyzer` fulfils it with the screen → confirm cascade, and
tests may substitute their own.

One analyzer per worker thread: torch modules with Grad-CAM hooks keep per-call state
and are not safe to share between threads.
"""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicom_node.config import InferenceSettings
from dicom_node.logs import get_logger
from dicom_node.outputs import build_outputs
from dicom_node.results.common import Equipment
from dicom_node.results.registry import BuildInputs, output_names, output_types
from inference.bundle import Bundle, Label
from inference.cascade import SCORED, Cascade, Finding, ImageResult

log = get_logger(__name__)
MODEL_KEY_LENGTH = 255
_WARM_UP_SIDE = 512
_WARM_UP_LABEL = Label("warm-up", "WARMUP", "99CXRAI", "Warm-up")  # never leaves the process


class Analyzer(Protocol):
    """What the worker pipeline needs from the analyzer."""

    @property
    def identity(self) -> str:
        """The models in force, exactly (the key of the ``results`` row)."""
        ...

    def analyze(self, datasets: Sequence[Dataset]) -> list[ImageResult]:
        """One result per data set, in order; never raises for a bad image."""
        ...


def bundle_identity(bundle: Bundle) -> str:
    """Name, version, weights digest and thresholds: everything that decides a result."""
    thresholds = ",".join(
        f"{name}={value:.6g}" for name, value in sorted(bundle.thresholds.items())
    )
    return f"{bundle.name}@{bundle.version}#{bundle.sha256[:12]}[{thresholds}]"


class CascadeAnalyzer:
    """The screen → confirm cascade behind the :class:`Analyzer` contract."""

    def __init__(self, cascade: Cascade) -> None:
        self.cascade = cascade
        self.decision = decision_models(cascade)
        identity = "+".join(bundle_identity(bundle) for bundle in cascade.bundles())
        if len(identity) > MODEL_KEY_LENGTH:  # several findings: keep it unique, and short
            digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
            identity = f"{identity[: MODEL_KEY_LENGTH - 18]}~{digest}"
        self.identity = identity

    def analyze(self, datasets: Sequence[Dataset]) -> list[ImageResult]:
        return self.cascade.analyze(datasets)


def decision_models(cascade: Cascade) -> dict[str, tuple[str, str]]:
    """Finding code → (name, version) of the model whose threshold makes the call: a
    classifier finding's confirm bundle, cardiomegaly's segmentation bundle."""
    decision = {f.label.code: (f.confirm.name, f.confirm.version) for f in cascade.findings}
    if cascade.cardiomegaly is not None:
        rule = cascade.cardiomegaly
        decision[rule.label.code] = (rule.model_name, rule.model_version)
    return decision


def load_analyzer(
    settings: InferenceSettings,
    bundle_paths: Mapping[str, Mapping[str, Path]] | None = None,
    bundle_ratio: bool = False,
) -> CascadeAnalyzer:
    """Load and verify the bundles (raises ``inference.bundle.BundleError``);
    ``bundle_paths`` puts registry versions in force (finding → role → folder), and
    ``bundle_ratio`` keeps the segmentation bundle's own cardiomegaly threshold."""
    if settings.threads:
        import torch

        torch.set_num_threads(settings.threads)
    kwargs = settings.cascade_kwargs()
    if bundle_paths:
        kwargs["bundle_paths"] = bundle_paths
    if bundle_ratio:
        kwargs["anatomy_options"] = {**kwargs["anatomy_options"], "cardiomegaly_ratio": None}
    analyzer = CascadeAnalyzer(Cascade.load(**kwargs))
    log.info(
        "models loaded",
        findings=[finding.name for finding in analyzer.cascade.findings],
        bundles=[bundle_identity(bundle) for bundle in analyzer.cascade.bundles()],
        screen_threshold_override=settings.screen_threshold,
        confirm_threshold_override=settings.confirm_threshold,
    )
    return analyzer


def warm_up(analyzer: Analyzer, equipment: Equipment) -> None:
    """Run every step once on a synthetic radiograph, so the first real image is not slow.

    The first forward pass allocates, and highdicom loads its code dictionaries on first
    use (about a second): without this the first patient's image pays for both.
    Best effort — a failure is logged and ignored; the real images will show any problem.
    """
    source = synthetic_radiograph()
    try:
        analyzer.analyze([source])
        result = ImageResult(
            str(source.SOPInstanceUID),
            SCORED,
            findings=[Finding(_WARM_UP_LABEL, 0.5, False, "screen", 0.5, "warm-up", "0")],
            overlay=np.zeros((64, 64, 3), dtype=np.uint8),
        )
        inputs = BuildInputs(
            source=source,
            result=result,
            equipment=equipment,
            content_datetime=datetime.datetime.now(),
            source_variant=None,
            priority="routine",
        )
        build_outputs(output_types(output_names()), inputs)
    except Exception as exc:  # best effort by design
        log.warning("analyzer warm-up failed", error_type=type(exc).__name__, error=str(exc)[:200])


def synthetic_radiograph(side: int = _WARM_UP_SIDE) -> Dataset:
    """A DX chest PA of smooth noise: enough header and pixels for every step to run."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "DX", "CHEST", "PA"
    ds.PatientName, ds.PatientID = "WARMUP^SYNTHETIC", "WARMUP"
    ds.PatientOrientation = ["P", "F"]
    ds.ImagerPixelSpacing = [0.5, 0.5]
    ds.Rows = ds.Columns = side
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    rng = np.random.default_rng(0)
    pixels = (rng.random((side, side)) * 4095).astype(np.uint16)
    ds.PixelData = pixels.tobytes()
    return ds
