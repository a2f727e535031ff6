"""The cascade with the anatomy: adults measured, cardiomegaly on PA only, the lung gate,
the explanation check, the overlay's outlines."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataset import Dataset

from inference import anatomy
from inference.cascade import NOT_SCORED, SCORED, Cascade
from inference.findings import NOT_ASSESSED
from tests.inference.conftest import data_root
from tests.nih_dicom import NihImage, dx_dataset, pick, read_labels
from tests.support import as_child


@pytest.fixture(scope="module")
def nih() -> list[NihImage]:
    return read_labels(data_root() / "nih-sample")


@pytest.fixture(scope="module")
def adults_pa(nih: list[NihImage]) -> list[Dataset]:
    return [dx_dataset(image) for image in pick(nih, {"PA": 4})]


def by_code(result, code: str):  # type: ignore[no-untyped-def]
    return next(f for f in result.findings_as_dicts() if f["code"] == code)


def test_adult_pa_films_are_measured_and_assessed_for_cardiomegaly(
    cascade: Cascade, adults_pa: list[Dataset]
) -> None:
    for result in cascade.analyze(adults_pa):
        assert result.status == SCORED, result.reason
        assert by_code(result, "233604007")["status"] == NOT_ASSESSED  # pediatric model
        cardiomegaly = by_code(result, "8186001")
        assert cardiomegaly["status"] == "assessed" and cardiomegaly["stage"] == "measurement"
        assert 0.0 <= cardiomegaly["probability"] <= 1.0
        ratio = next(m for m in result.as_dict()["measurements"] if m["code"] == "CTR")
        assert 0.3 < ratio["value"] < 0.7
        assert cardiomegaly["present"] == (ratio["value"] > 0.5)
        units = {m["name"]: m["unit"] for m in result.as_dict()["measurements"]}
        assert units["heart_width"] == "mm" and units["left_lung_area"] == "cm2"
        assert result.masks is not None and result.masks.shape == (3, 256, 256)
        assert result.overlay is not None  # outlines and widths, no heatmap
        assert result.cam is None and result.explained_finding is None


def test_ap_films_are_not_assessed_for_cardiomegaly(cascade: Cascade, nih: list[NihImage]) -> None:
    result = cascade.analyze([dx_dataset(pick(nih, {"AP": 1})[0])])[0]
    cardiomegaly = by_code(result, "8186001")
    assert cardiomegaly["status"] == NOT_ASSESSED and "AP view" in cardiomegaly["reason"]
    # Adult AP: nothing in force answers for it, so the image is not scored at all.
    assert result.status == NOT_SCORED and "no finding assessed" in result.reason


def test_children_are_segmented_for_the_checks_but_not_measured(
    cascade: Cascade, adults_pa: list[Dataset]
) -> None:
    result = cascade.analyze([as_child(adults_pa[0])])[0]
    assert result.status == SCORED
    assert by_code(result, "233604007")["status"] == "assessed"
    assert "outside the validated ages 18" in by_code(result, "8186001")["reason"]
    assert result.anatomy is not None and result.anatomy.status == NOT_ASSESSED
    assert result.masks is None and result.as_dict()["measurements"] == []
    # The pneumonia heatmap is checked against the lung fields all the same.
    explained = result.explained_finding
    assert explained is not None and explained.cam_lung_share is not None
    assert 0.0 <= explained.cam_lung_share <= 1.0
    assert by_code(result, "233604007")["cam_lung_share"] == pytest.approx(
        explained.cam_lung_share, abs=1e-4
    )


def one_lung(masks: list[np.ndarray]) -> list[np.ndarray]:
    """What the segmentation finds on an image that is not a frontal chest: one lung."""
    for m in masks:
        m[2] = False
    return masks


@pytest.mark.parametrize("gate", [True, False])
def test_an_image_without_a_plausible_pair_of_lungs_is_not_scored(
    adults_pa: list[Dataset], monkeypatch: pytest.MonkeyPatch, gate: bool
) -> None:
    """The anatomy gate, switchable: the segmentation's verdict (here: one lung field
    only) refuses an image the header and feature gates admitted."""
    cascade = Cascade.load(anatomy_options={"gate": gate})
    assert cascade.segmenter is not None
    real = cascade.segmenter.masks
    monkeypatch.setattr(cascade.segmenter, "masks", lambda images: one_lung(real(images)))
    result = cascade.analyze([as_child(adults_pa[1])])[0]
    assert result.in_domain  # the feature gate admitted it
    if gate:
        assert result.status == NOT_SCORED
        assert result.reason == (
            "only one lung field found (right lung): no plausible pair of lung fields, "
            "not scored as a chest radiograph"
        )
        assert all(f["status"] == NOT_ASSESSED for f in result.findings_as_dicts())
    else:
        assert result.status == SCORED
        assert result.anatomy is not None and result.anatomy.status == NOT_ASSESSED


def test_overlay_outlines_follow_the_configuration(adults_pa: list[Dataset]) -> None:
    drawn = Cascade.load().analyze([adults_pa[3]])[0]
    plain = Cascade.load(anatomy_options={"outlines": False, "ctr_lines": False})
    bare = plain.analyze([adults_pa[3]])[0]
    assert drawn.overlay is not None and bare.overlay is not None
    assert magenta_pixels(drawn.overlay) > 100  # heart outline and width line
    assert magenta_pixels(bare.overlay) < 10


def magenta_pixels(rgb: np.ndarray) -> int:
    return int(((rgb[..., 0] > 240) & (rgb[..., 1] < 20) & (rgb[..., 2] > 240)).sum())


def test_lung_masks_of_the_shipped_model_match_the_reference_on_known_images() -> None:
    """The shipped segmenter on a few annotated images (seen in training: a smoke check of
    the bundle and the serving chain, not an accuracy figure — those are cross-validated
    in the model card)."""
    import csv

    from PIL import Image

    from inference.segment import Segmenter

    root = data_root() / "cxr-anatomy"
    with (root / "labels.csv").open() as fh:
        rows = list(csv.DictReader(fh))[:4]
    segmenter = Segmenter.load()
    images = [
        np.asarray(Image.open(root / r["image"]).convert("L"), np.float32) / 255 for r in rows
    ]
    for row, masks in zip(rows, segmenter.masks(images), strict=True):
        truth = np.stack(
            [
                np.asarray(Image.open(root / row[s.name]).convert("L")) > 127
                for s in anatomy.STRUCTURES
            ]
        )
        small = truth[:, ::2, ::2]
        assert anatomy.dice(masks[1], small[1]) > 0.85 and anatomy.dice(masks[2], small[2]) > 0.85
        assert anatomy.dice(masks[0], small[0]) > 0.75
