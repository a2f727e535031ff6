"""Drift references: binning, PSI, the homogeneity test, the alarm levels, header
descriptors, and the references shipped in the bundles."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from inference import reference as ref
from inference.manifest import SEGMENT_BUNDLE, read_metadata, sha256_file, verify
from inference.reference import (
    P_SIGNIFICANT,
    PSI_ALERT,
    PSI_WARN,
    REFERENCE,
    categorical_reference,
    input_descriptors,
    level,
    live_counts,
    numeric_reference,
    psi,
    read_reference,
    two_sample_p,
    write_reference,
)

SCREEN = Path(ref.__file__).parent / "bundles" / "cxr_pneumonia_screen_mobilenetv3"
CONFIRM = Path(ref.__file__).parent / "bundles" / "cxr_pneumonia_confirm_resnet18"


def test_numeric_reference_bins_at_its_own_deciles() -> None:
    values = np.random.default_rng(0).normal(size=5000).tolist()
    signal = numeric_reference(values)
    assert signal["kind"] == "numeric" and signal["n"] == 5000
    assert len(signal["edges"]) == 9 and signal["edges"] == sorted(signal["edges"])
    assert len(signal["counts"]) == 10 and sum(signal["counts"]) == 5000
    assert all(450 <= c <= 550 for c in signal["counts"])


def test_numeric_reference_collapses_tied_quantiles_and_ignores_missing() -> None:
    signal = numeric_reference([0.0] * 80 + [1.0] * 20 + [None, float("nan")])
    # deciles 0.1-0.7 are all 0.0 (one edge), 0.8 interpolates, 0.9 is 1.0
    assert signal["edges"] == pytest.approx([0.0, 0.2, 1.0]) and signal["n"] == 100
    assert signal["counts"] == [0, 80, 0, 20]  # side="right": a value on an edge goes up
    assert numeric_reference([]) == {"kind": "numeric", "edges": [], "counts": [0], "n": 0}


def test_live_values_are_binned_with_the_reference_edges() -> None:
    signal = {"kind": "numeric", "edges": [0.5, 1.5], "counts": [1, 1, 1], "n": 3}
    assert live_counts(signal, [-9.0, 0.5, 1.0, 1.5, 99.0, None, float("nan")]) == [1, 2, 2]


def test_unseen_categories_go_to_other_and_missing_to_unknown() -> None:
    signal = categorical_reference(["GE", "GE", "Agfa", None])
    assert signal == {"kind": "categorical", "counts": {"Agfa": 1, "GE": 2, "unknown": 1}, "n": 4}
    counts = live_counts(signal, ["GE", "Fuji", "Carestream", None, "Agfa"])
    assert counts == {"Agfa": 1, "GE": 1, "unknown": 1, "other": 2}
    # a category the reference lacks counts against it in PSI (floored, finite)
    assert psi(signal, {"other": 10}) > PSI_ALERT


def test_psi_is_zero_for_identical_and_large_for_shifted_distributions() -> None:
    rng = np.random.default_rng(1)
    signal = numeric_reference(rng.normal(size=4000).tolist())
    same = live_counts(signal, rng.normal(size=4000).tolist())
    shifted = live_counts(signal, rng.normal(loc=1.0, size=4000).tolist())
    assert psi(signal, signal["counts"]) == pytest.approx(0.0, abs=1e-12)
    assert psi(signal, same) < 0.02
    assert psi(signal, shifted) > PSI_ALERT
    assert psi(signal, [0] * 10) == 0.0  # no live value: nothing to compare


def test_psi_rejects_counts_binned_differently() -> None:
    signal = numeric_reference([0.1, 0.2, 0.3, 0.4])
    with pytest.raises(ValueError, match="bins"):
        psi(signal, [1, 2])


def test_two_sample_p_needs_both_a_shift_and_a_sample() -> None:
    signal = categorical_reference(["no"] * 9500 + ["yes"] * 500)
    assert two_sample_p(signal, {"no": 7000, "yes": 3000}) < 1e-6
    assert two_sample_p(signal, {"no": 9, "yes": 1}) > 0.5  # the same shares, tiny sample
    assert two_sample_p(signal, {"no": 3, "yes": 1}) > P_SIGNIFICANT  # 5x the share, 4 images
    assert two_sample_p(signal, {"no": 950, "yes": 50}) > 0.5
    # one column left after dropping the empty ones: no test possible
    assert two_sample_p(categorical_reference(["no"] * 10), {"no": 4}) == 1.0


@pytest.mark.parametrize(
    ("psi_value", "p_value", "expected"),
    [
        (0.0, 0.0, "ok"),
        (PSI_WARN - 1e-9, 1e-9, "ok"),
        (PSI_WARN, 0.009, "warn"),
        (PSI_ALERT - 1e-9, 1e-9, "warn"),
        (PSI_ALERT, 0.009, "alert"),
        (5.0, 1e-12, "alert"),
        (5.0, 0.01, "ok"),  # a large PSI on a sample too small to be significant
        (0.3, 0.5, "ok"),
    ],
)
def test_level_bands(psi_value: float, p_value: float, expected: str) -> None:
    assert level(psi_value, p_value) == expected


def test_small_live_samples_do_not_alarm_while_large_shifts_do() -> None:
    rng = np.random.default_rng(2)
    signal = numeric_reference(rng.uniform(size=2000).tolist())
    few = live_counts(signal, rng.uniform(size=8).tolist())  # PSI noisy, not significant
    assert level(psi(signal, few), two_sample_p(signal, few)) == "ok"
    moved = live_counts(signal, (rng.uniform(size=2000) ** 3).tolist())
    assert level(psi(signal, moved), two_sample_p(signal, moved)) == "alert"


def test_input_descriptors_of_a_regular_header() -> None:
    ds = Dataset()
    ds.PatientAge = "004Y"
    ds.PatientSex = "F"
    ds.ViewPosition = "pa"
    ds.Manufacturer = "  Agfa "
    ds.ImagerPixelSpacing = [0.15, 0.15]
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.BitsStored = 12
    assert input_descriptors(ds) == {
        "age": 4.0,
        "sex": "F",
        "view": "PA",
        "manufacturer": "Agfa",
        "pixel_spacing": 0.15,
        "photometric": "MONOCHROME1",
        "bits": "12",
    }


def test_input_descriptors_never_raise_on_odd_headers() -> None:
    assert input_descriptors(Dataset()) == dict.fromkeys(ref.SIGNALS_DESCRIPTORS)
    # values as read from a file (validated only when accessed): unparseable ones
    raw = {
        0x00101010: ("AS", b"abc "),  # not an Age String
        0x00100030: ("DA", b"20200230"),  # no such day
        0x00080020: ("DA", b"20240101"),
        0x00100040: ("CS", b"X "),
        0x00185101: ("CS", b""),
        0x00080070: ("LO", b"    "),
        0x00280030: ("DS", b"bad\\0.1 "),
        0x00280004: ("CS", b""),
        0x00280101: ("US", b"\x0c"),  # one byte: not an unsigned short
    }
    ds = Dataset(
        {
            tag: RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)
            for tag, (vr, value) in raw.items()
        }
    )
    out = input_descriptors(ds)
    assert out == dict.fromkeys(ref.SIGNALS_DESCRIPTORS)
    ds = Dataset()
    ds.PatientBirthDate = "20200101"
    ds.StudyDate = "20240101"
    ds.PixelSpacing = [0.0, 0.0]  # not a spacing
    ds.ImagerPixelSpacing = [0.2, 0.2]
    out = input_descriptors(ds)
    assert out["age"] == pytest.approx(4.0, abs=0.01) and out["pixel_spacing"] == 0.2


def test_descriptor_signals_leave_out_what_no_image_records() -> None:
    signals = ref.descriptor_signals(
        [
            {"age": 3.0, "sex": "M", "bits": "12", "view": None},
            {"age": None, "sex": None, "bits": "8", "view": None},
        ]
    )
    assert set(signals) == {"age", "sex", "bits"}
    assert signals["age"]["n"] == 1 and signals["sex"]["counts"] == {"M": 1, "unknown": 1}


def test_write_and_read_reference_keep_the_manifest_verifiable(tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "models").mkdir()
    (bundle / "models" / "model.pt").write_bytes(b"weights")
    weights_digest = sha256_file(bundle / "models" / "model.pt")
    meta = {"name": "x", "sha256": {"models/model.pt": weights_digest}}
    (bundle / "configs" / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
    assert read_reference(bundle) is None
    signals = ref.outcome_signals(
        "233604007", [0.1, 0.9, None], [0.3, 0.4, 2.0], [False] * 2 + [True]
    )
    document = ref.build_reference(signals, "a test set")
    write_reference(bundle, document)
    text = (bundle / "configs" / "metadata.json").read_text()
    assert text.endswith("}\n") and '\n  "sha256": {' in text
    written = read_metadata(bundle)
    assert written["sha256"]["models/model.pt"] == weights_digest
    assert written["sha256"][REFERENCE] == sha256_file(bundle / REFERENCE)
    assert set(verify(bundle)) == {"models/model.pt", REFERENCE}
    loaded = read_reference(bundle)
    assert loaded is not None and loaded["data"] == "a test set" and loaded["schema"] == 1
    assert loaded["signals"]["probability:233604007"]["n"] == 2
    assert loaded["signals"]["refused"]["counts"] == {"no": 2, "yes": 1}
    (bundle / REFERENCE).write_text("{}")
    with pytest.raises(ref.BundleError):
        read_reference(bundle)


SHIPPED = {
    SCREEN: {"probability:233604007", "gate_distance", "refused"},
    CONFIRM: {"probability:233604007", "gate_distance", "refused"},
    SEGMENT_BUNDLE: {"probability:8186001", "refused"},
}


@pytest.mark.parametrize("path", list(SHIPPED), ids=lambda p: p.name)
def test_shipped_bundles_carry_a_verified_reference(path: Path) -> None:
    meta = read_metadata(path)
    assert REFERENCE in meta["sha256"]
    assert REFERENCE in verify(path)  # the digest listed is the file's
    document = read_reference(path)
    assert document is not None and document["data"] and document["computed_at"].endswith("Z")
    signals = document["signals"]
    assert set(signals) == SHIPPED[path]  # JPEG/PNG training data: no header descriptors
    for key, signal in signals.items():
        counts = signal["counts"]
        total = sum(counts.values()) if signal["kind"] == "categorical" else sum(counts)
        assert total == signal["n"] > 0, key
        if signal["kind"] == "numeric":
            assert len(counts) == len(signal["edges"]) + 1
            assert signal["edges"] == sorted(set(signal["edges"]))
    assert set(signals["refused"]["counts"]) <= {"yes", "no"}
    n_refused = signals["refused"]["counts"].get("yes", 0)
    probability = next(k for k in signals if k.startswith("probability:"))
    assert signals[probability]["n"] == signals["refused"]["n"] - n_refused


@pytest.mark.parametrize("path", [SCREEN, CONFIRM], ids=["screen", "confirm"])
def test_pneumonia_references_cover_the_validation_split(path: Path) -> None:
    meta = read_metadata(path)
    document = read_reference(path)
    assert document is not None
    assert document["signals"]["refused"]["n"] == meta["training"]["val_images"]
    assert f"{meta['training']['val_images']} images" in document["data"]


def test_segment_reference_says_it_is_in_sample() -> None:
    document = read_reference(SEGMENT_BUNDLE)
    assert document is not None and "in-sample" in document["data"]
    assert (
        document["signals"]["refused"]["n"] == read_metadata(SEGMENT_BUNDLE)["training"]["images"]
    )


def test_segment_training_reference_uses_the_out_of_fold_measurements() -> None:
    from inference.train_segment import drift_reference

    meta = read_metadata(SEGMENT_BUNDLE)
    oof = np.array([0.40, 0.55, np.nan, 0.60])
    measurable = np.array([True, True, True, False])
    document = drift_reference(oof, measurable, meta)
    signals = document["signals"]
    assert signals["refused"]["counts"] == {"no": 2, "yes": 2}
    assert signals["probability:8186001"]["n"] == 2
    assert "out-of-fold" in document["data"]


def test_finding_training_reference_follows_the_cascade_for_the_confirm() -> None:
    from inference.train_finding import FINDINGS, drift_reference

    spec = FINDINGS["tuberculosis"]
    oof = {
        "screen": {"oof_probabilities": np.array([0.1, 0.6, 0.9]), "threshold": 0.5},
        "confirm": {"oof_probabilities": np.array([0.8, 0.2, 0.7]), "threshold": 0.5},
    }
    screen = drift_reference(spec, "screen", oof, 5)["signals"]
    confirm = drift_reference(spec, "confirm", oof, 5)["signals"]
    assert set(confirm) == {"probability:154283005"}  # no gate, no refusals measured
    final = numeric_reference([0.1, 0.2, 0.7])  # screen's 0.1 (below its threshold), confirm's
    assert confirm["probability:154283005"]["edges"] == final["edges"]
    assert screen["probability:154283005"]["n"] == 3
