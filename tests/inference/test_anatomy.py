"""Masks → measurements: the ratio as the dataset defines it, mm and cm², and refusals."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

from inference import anatomy
from inference.bundle import Label
from inference.cardiomegaly import CardiomegalyRule
from inference.findings import Finding, NotAssessed
from inference.population import ImageFacts
from tests.inference.conftest import data_root

SIZE = 256


def chest_masks(heart_cols: tuple[int, int] = (100, 170)) -> np.ndarray:
    """Right lung (image left) cols 40-119, left lung cols 136-215, heart as given."""
    masks = np.zeros((3, SIZE, SIZE), dtype=bool)
    masks[1, 40:200, 40:120] = True
    masks[2, 40:200, 136:216] = True
    masks[0, 120:190, heart_cols[0] : heart_cols[1]] = True
    return masks


def test_ratio_is_heart_extent_over_the_extent_across_both_lungs() -> None:
    found = anatomy.measure(chest_masks(), (SIZE, SIZE))
    assert found.assessed
    assert found.ctr == pytest.approx(70 / 176)
    assert [m.name for m in found.measurements] == ["cardiothoracic_ratio"]
    assert "no pixel spacing" in found.spacing_note


def test_widths_in_mm_and_areas_in_cm2_scale_back_to_the_source_grid() -> None:
    # A 2500 × 2048 detector at 0.15 mm: each working pixel is 9.77 × 8 source pixels.
    found = anatomy.measure(chest_masks(), (2500, 2048), (0.15, 0.15), "ImagerPixelSpacing")
    values = {m.name: m for m in found.measurements}
    assert values["cardiothoracic_ratio"].value == pytest.approx(70 / 176)
    assert values["heart_width"].value == pytest.approx(70 * 8 * 0.15)
    assert values["heart_width"].unit == "mm"
    assert values["thoracic_width"].value == pytest.approx(176 * 8 * 0.15)
    pixel_cm2 = (2500 / SIZE) * (2048 / SIZE) * 0.15 * 0.15 / 100
    assert values["right_lung_area"].value == pytest.approx(160 * 80 * pixel_cm2)
    assert values["right_lung_area"].unit == "cm2"
    assert values["left_lung_area"].code == "42798000"
    assert "ImagerPixelSpacing" in found.spacing_note and "magnif" in found.spacing_note


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda m: m[1:].fill(False), "no lung field found"),
        (lambda m: m[2].fill(False), "only one lung field found (right lung)"),
        (lambda m: m.__setitem__([1, 2], m[[2, 1]].copy()), "wrong sides"),
        (lambda m: m[0].fill(False), "no heart shadow found"),
    ],
)
def test_implausible_masks_are_not_measured(change, reason) -> None:  # type: ignore[no-untyped-def]
    masks = chest_masks()
    change(masks)
    found = anatomy.measure(masks, (SIZE, SIZE), (0.2, 0.2), "PixelSpacing")
    assert found.status == "not_assessed" and reason in found.reason
    assert found.ctr is None and found.measurements == []


def test_heart_outside_the_thorax_is_not_measured_but_lungs_are_plausible() -> None:
    masks = chest_masks(heart_cols=(200, 250))
    assert anatomy.lung_problem(masks) is None
    found = anatomy.measure(masks, (SIZE, SIZE))
    assert found.status == "not_assessed" and "heart shadow outside the thorax" in found.reason


def test_postprocess_keeps_the_largest_component_and_fills_holes() -> None:
    probs = chest_masks().astype(np.float32)
    probs[1, 5:8, 5:8] = 1.0  # a stray island far left: would widen the thorax
    probs[2, 100:105, 150:155] = 0.0  # a hole
    masks = anatomy.postprocess(probs)
    assert anatomy.extent(masks[1] | masks[2]) == (40, 215)
    assert masks[2, 100:105, 150:155].all()


def test_cam_share_counts_the_heatmap_mass_inside_a_region() -> None:
    cam = np.zeros((224, 224), dtype=np.float32)
    cam[:, :112] = 1.0
    region = np.zeros((SIZE, SIZE), dtype=bool)
    region[:, :128] = True
    assert anatomy.cam_share(cam, region) == pytest.approx(1.0)
    cam[:, 112:] = 1.0
    assert anatomy.cam_share(cam, region) == pytest.approx(0.5, abs=0.01)
    assert anatomy.cam_share(np.zeros_like(cam), region) is None


def test_the_dataset_ratio_is_reproduced_from_its_own_masks() -> None:
    """The definition in the code is the dataset's: its masks give its ratios."""
    root = data_root() / "cxr-anatomy"
    with (root / "labels.csv").open() as fh:
        rows = [r for r in csv.DictReader(fh) if r["ctr"]][:25]
    errors = []
    for row in rows:
        masks = np.stack(
            [
                np.asarray(Image.open(root / row[s.name]).convert("L")) > 127
                for s in anatomy.STRUCTURES
            ]
        )
        ratio = anatomy.ctr_of(masks)
        assert ratio is not None
        errors.append(abs(ratio - float(row["ctr"])))
    assert max(errors) < 0.01 and float(np.mean(errors)) < 0.003


RULE = CardiomegalyRule(
    Label("cardiomegaly", "8186001", "SCT", "Cardiomegaly"), 30.0, -15.0, 0.5, "seg", "1.0.0"
)


def test_cardiomegaly_is_called_from_the_ratio_on_pa_films() -> None:
    big = anatomy.measure(chest_masks(heart_cols=(70, 170)), (SIZE, SIZE))
    assert big.ctr is not None and big.ctr > 0.5
    finding = RULE.assess(big, ImageFacts(60, "PA", "DX"))
    assert isinstance(finding, Finding)
    assert finding.present and finding.probability > 0.5 and finding.stage == "measurement"
    assert finding.threshold == pytest.approx(0.5)
    normal = RULE.assess(anatomy.measure(chest_masks(), (SIZE, SIZE)), ImageFacts(60, "PA", "DX"))
    assert isinstance(normal, Finding) and not normal.present and normal.probability < 0.5


@pytest.mark.parametrize(("view", "reason"), [("AP", "AP view"), (None, "view not stated")])
def test_cardiomegaly_is_not_assessed_on_ap_or_unknown_views(view, reason) -> None:  # type: ignore[no-untyped-def]
    found = anatomy.measure(chest_masks(heart_cols=(70, 170)), (SIZE, SIZE))
    outcome = RULE.assess(found, ImageFacts(60, view, "DX"))
    assert isinstance(outcome, NotAssessed)
    assert reason in outcome.reason and "magnified" in outcome.reason


def test_cardiomegaly_is_not_assessed_without_a_measurable_anatomy() -> None:
    masks = chest_masks()
    masks[0] = False
    outcome = RULE.assess(anatomy.measure(masks, (SIZE, SIZE)), ImageFacts(60, "PA", "DX"))
    assert isinstance(outcome, NotAssessed) and "no heart shadow found" in outcome.reason
