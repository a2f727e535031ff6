"""The whole engine on real radiographs: gate, screen → confirm, Grad-CAM."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
import pytest

from inference.cascade import ERROR, NOT_SCORED, SCORED, Cascade
from tests.support import as_child

from .conftest import CHEST_FILES, NON_CHEST_FILES


@pytest.fixture(scope="module")
def chest_results(cascade: Cascade, dicom_dir: Path) -> dict[str, object]:
    datasets = [as_child(pydicom.dcmread(dicom_dir / name)) for name in CHEST_FILES]
    return dict(zip(CHEST_FILES, cascade.analyze(datasets), strict=True))


@pytest.mark.parametrize("name", CHEST_FILES)
def test_chest_radiographs_are_scored_with_a_coded_finding(
    chest_results: dict, dicom_dir: Path, name: str
) -> None:
    result = chest_results[name]
    assert result.status == SCORED, result.reason
    (finding,) = result.findings
    assert (finding.label.code, finding.label.scheme) == ("233604007", "SCT")
    assert 0.0 <= finding.probability <= 1.0
    assert finding.stage in ("screen", "confirm")
    if finding.stage == "screen":
        assert not finding.present  # the screen only ever rules out
    else:
        assert finding.present == (finding.probability >= finding.threshold)
    ds = pydicom.dcmread(dicom_dir / name, stop_before_pixels=True)
    assert result.heatmap.shape == (ds.Rows, ds.Columns)
    assert result.overlay.dtype == np.uint8 and result.overlay.shape[2] == 3
    assert max(result.overlay.shape[:2]) <= 1024
    assert result.in_domain is True


def test_uncompressed_rg1_chest_is_scored(cascade: Cascade, rg1_uncr: pydicom.Dataset) -> None:
    (result,) = cascade.analyze([as_child(copy.deepcopy(rg1_uncr))])
    assert result.status == SCORED and result.findings


@pytest.mark.parametrize("name", NON_CHEST_FILES)
def test_non_chest_files_are_not_scored(cascade: Cascade, dicom_dir: Path, name: str) -> None:
    (result,) = cascade.analyze([pydicom.dcmread(dicom_dir / name)])
    assert result.status == NOT_SCORED and result.reason
    assert not result.findings and result.overlay is None
    assert {entry["status"] for entry in result.findings_as_dicts()} == {"not_assessed"}


def _disguised_as_chest(ds: pydicom.Dataset) -> pydicom.Dataset:
    """The same pixels with a header that claims a frontal chest radiograph."""
    ds = copy.deepcopy(ds)
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "DX", "CHEST", "PA"
    for keyword in ("StudyDescription", "SeriesDescription", "ImageLaterality", "Laterality"):
        if keyword in ds:
            delattr(ds, keyword)
    return ds


def test_image_level_gate_refuses_a_dental_film_with_a_chest_header(
    cascade: Cascade, dicom_dir: Path
) -> None:
    ds = _disguised_as_chest(pydicom.dcmread(dicom_dir / "dental-cr-modality-lut-jpeglossless.dcm"))
    (result,) = cascade.analyze([ds])
    assert result.status == NOT_SCORED
    assert "far from the training data" in result.reason
    assert result.in_domain is False


@pytest.mark.parametrize("kind", ["noise", "blank"])
def test_image_level_gate_refuses_non_radiograph_pixels(
    cascade: Cascade, rg1_uncr: pydicom.Dataset, kind: str
) -> None:
    ds = copy.deepcopy(rg1_uncr)
    rng = np.random.default_rng(0)
    shape = (ds.Rows, ds.Columns)
    pixels = rng.integers(0, 4096, shape) if kind == "noise" else np.full(shape, 100)
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    (result,) = cascade.analyze([ds])
    assert result.status == NOT_SCORED and "far from the training data" in result.reason


def test_wrong_photometric_header_is_detected_and_corrected(chest_results: dict) -> None:
    right = chest_results["siim-cr-jpegbaseline.dcm"]
    wrong = chest_results["siim-cr-jpegbaseline-mono1-header.dcm"]
    assert any("polarity" in w for w in wrong.warnings)
    assert not any("polarity" in w for w in right.warnings)
    assert wrong.findings[0].probability == pytest.approx(right.findings[0].probability, abs=1e-4)


def test_batch_gives_the_same_answers_as_one_by_one(cascade: Cascade, dicom_dir: Path) -> None:
    datasets = [as_child(pydicom.dcmread(dicom_dir / name)) for name in CHEST_FILES[:3]]
    batched = cascade.analyze(datasets)
    for ds, together in zip(datasets, batched, strict=True):
        (alone,) = cascade.analyze([ds])
        assert alone.findings[0].probability == pytest.approx(
            together.findings[0].probability, abs=1e-4
        )


def test_undecodable_image_is_an_error_result_not_an_exception(
    cascade: Cascade, rg1_uncr: pydicom.Dataset, dicom_dir: Path
) -> None:
    broken = copy.deepcopy(rg1_uncr)
    broken.PixelData = broken.PixelData[:1000]
    good = as_child(pydicom.dcmread(dicom_dir / "siim-cr-jpegbaseline.dcm"))
    results = cascade.analyze([broken, good])
    assert results[0].status == ERROR and "cannot decode" in results[0].reason
    assert results[1].status == SCORED


def test_without_heatmaps_no_gradcam_is_computed(dicom_dir: Path) -> None:
    fast = Cascade.load(heatmaps=False)
    (result,) = fast.analyze([as_child(pydicom.dcmread(dicom_dir / "siim-cr-jpegbaseline.dcm"))])
    assert result.status == SCORED and result.heatmap is None and "gradcam" not in result.timings_ms


def test_repeated_analysis_does_not_pile_hooks_onto_the_networks(
    cascade: Cascade, dicom_dir: Path
) -> None:
    from inference import explain

    ds = as_child(pydicom.dcmread(dicom_dir / "siim-cr-jpegbaseline.dcm"))
    cascade.analyze([ds])
    target = explain._cam_for(cascade.screen.network).nn_module.model.target

    def hooks() -> int:
        modules = [target, *cascade.screen.network.modules()]
        return sum(len(m._forward_hooks) + len(m._backward_hooks) for m in modules)

    before = hooks()
    for _ in range(3):
        cascade.analyze([ds])
    assert hooks() == before <= 2


def test_gradcam_matches_monai_on_the_whole_network(cascade: Cascade) -> None:
    """The split network gives MONAI's GradCAM exactly the maps of the plain one."""
    import torch
    from monai.visualize import GradCAM

    from inference import explain

    x = torch.randn(2, 1, 224, 224, generator=torch.Generator().manual_seed(0))
    for network, layer in (
        (cascade.screen.network, "features"),
        (cascade.confirm.network, "layer4"),
    ):
        net = copy.deepcopy(network)  # MONAI's hooks stay on the module they are put on
        reference = GradCAM(nn_module=net, target_layers=layer)(x, class_idx=0).squeeze(1)
        assert torch.allclose(explain.grad_cam(net, x), reference, atol=1e-5)
