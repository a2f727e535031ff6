"""Intended populations: the age, view and modality a finding's models answer for.

The pediatric pneumonia models flagged pneumonia on half of all adult films when applied
outside their population; here they must say "not assessed", with the reason, instead.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from inference.cascade import NOT_SCORED, SCORED, Cascade
from inference.findings import NOT_ASSESSED
from inference.population import ImageFacts, Population, parse_age_string, patient_age_years

PEDIATRIC = Population(age_min=1, age_max=5, views=("PA", "AP"), modalities=("CR", "DX"))


@pytest.mark.parametrize(
    ("text", "years"),
    [("004Y", 4.0), ("018M", 1.5), ("010W", 70 / 365.25), ("062", 62.0), ("", None), ("4Y2", None)],
)
def test_age_strings(text: str, years: float | None) -> None:
    assert parse_age_string(text) == (pytest.approx(years) if years is not None else None)


def _header(**values: str) -> Dataset:
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def test_age_from_birth_date_when_patient_age_is_missing() -> None:
    assert patient_age_years(_header(PatientBirthDate="20200601", StudyDate="20240602")) == (
        pytest.approx(4.0, abs=0.01)
    )
    assert patient_age_years(_header(PatientBirthDate="20200601")) is None  # no study date
    assert patient_age_years(_header(PatientBirthDate="19000101", StudyDate="20190416")) is None
    assert patient_age_years(_header(PatientAge="007Y", PatientBirthDate="20200601")) == 7.0


@pytest.mark.parametrize(
    ("facts", "inside"),
    [
        (ImageFacts(1.0, "PA", "DX"), True),
        (ImageFacts(5.9, "AP", "CR"), True),
        (ImageFacts(0.8, "PA", "DX"), False),
        (ImageFacts(6.0, "PA", "DX"), False),
        (ImageFacts(45.0, "PA", "DX"), False),
        (ImageFacts(None, "PA", "DX"), False),
        (ImageFacts(3.0, "LL", "DX"), False),
        (ImageFacts(3.0, None, "DX"), True),  # not stated: frontal, as the header gate
        (ImageFacts(3.0, "PA", "MR"), False),
    ],
)
def test_pediatric_population(facts: ImageFacts, inside: bool) -> None:
    reason = PEDIATRIC.reason_outside(facts)
    assert (reason is None) == inside
    if facts.age_years is None:
        assert reason is not None and "age unknown" in reason


def test_unknown_age_can_be_declared_assessable() -> None:
    lenient = Population.from_metadata({"age_years": [18, 120], "unknown_age": "assess"})
    assert lenient.reason_outside(ImageFacts(None, "PA", "DX")) is None
    assert lenient.reason_outside(ImageFacts(12.0, "PA", "DX")) is not None
    with pytest.raises(ValueError):
        Population.from_metadata({"unknown_age": "guess"})


@pytest.fixture(scope="module")
def pneumonia_only() -> Cascade:
    return Cascade.load(findings=("pneumonia",), heatmaps=False)


def test_shipped_pneumonia_models_declare_the_pediatric_range(pneumonia_only: Cascade) -> None:
    (finding,) = pneumonia_only.findings
    assert (finding.population.age_min, finding.population.age_max) == (1.0, 5.0)
    assert finding.population.unknown_age == "not_assessed"


def test_pediatric_model_does_not_assess_adults_or_unknown_ages(
    pneumonia_only: Cascade, dicom_dir: Path
) -> None:
    adult = pydicom.dcmread(dicom_dir / "siim-cr-jpegbaseline.dcm")  # Patient Age 62
    child = copy.deepcopy(adult)
    child.PatientAge = "003Y"
    unknown = copy.deepcopy(adult)
    del unknown.PatientAge
    adult_result, child_result, unknown_result = pneumonia_only.analyze([adult, child, unknown])

    assert child_result.status == SCORED and child_result.findings
    for result, words in ((adult_result, "62 years"), (unknown_result, "age unknown")):
        assert result.status == NOT_SCORED and not result.findings
        (entry,) = result.findings_as_dicts()
        assert entry["status"] == NOT_ASSESSED and words in entry["reason"]
        assert entry["present"] is False and "probability" not in entry
        assert result.overlay is None


def test_every_finding_in_force_is_listed_even_when_the_gate_refuses(
    pneumonia_only: Cascade, dicom_dir: Path
) -> None:
    (hip,) = pneumonia_only.analyze([pydicom.dcmread(dicom_dir / "rg2-hip-cr-jpegextended.dcm")])
    (entry,) = hip.findings_as_dicts()
    assert entry["status"] == NOT_ASSESSED and entry["reason"] == hip.reason
