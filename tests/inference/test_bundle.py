"""The shipped model bundles: layout, metadata, integrity check."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from inference.bundle import CONFIRM_BUNDLE, SCREEN_BUNDLE, WEIGHTS, BundleError, load_bundle


@pytest.mark.parametrize("path", [SCREEN_BUNDLE, CONFIRM_BUNDLE], ids=["screen", "confirm"])
def test_shipped_bundle_is_complete_and_small(path: Path) -> None:
    meta = json.loads((path / "configs" / "metadata.json").read_text())
    for key in (
        "version",
        "changelog",
        "labels",
        "thresholds",
        "calibration",
        "network_data_format",
        "eval_metrics",
        "sha256",
    ):
        assert key in meta, key
    assert meta["labels"][0]["code"] == "233604007" and meta["labels"][0]["scheme"] == "SCT"
    assert meta["calibration"]["temperature"] > 0
    assert (path / "docs" / "README.md").read_text().count("CC BY 4.0") >= 1
    assert (path / WEIGHTS).stat().st_size < 25 * 2**20


def test_validation_targets_are_recorded_and_met() -> None:
    screen = json.loads((SCREEN_BUNDLE / "configs" / "metadata.json").read_text())
    confirm = json.loads((CONFIRM_BUNDLE / "configs" / "metadata.json").read_text())
    s, c = screen["eval_metrics"]["validation"], confirm["eval_metrics"]["validation"]
    assert s["auroc"] >= 0.97 and c["auroc"] >= 0.97
    assert s["sensitivity"] >= 0.97
    assert s["ece"] <= 0.05 and c["ece"] <= 0.05


def test_bundle_loads_in_eval_mode_with_fp32_weights() -> None:
    bundle = load_bundle(SCREEN_BUNDLE)
    assert not bundle.network.training
    assert all(
        p.dtype.is_floating_point and p.dtype.itemsize == 4 for p in bundle.network.parameters()
    )
    assert len(bundle.sha256) == 64 and bundle.role == "screen"


def test_tampered_weights_are_refused(tmp_path: Path) -> None:
    copy = tmp_path / "bundle"
    shutil.copytree(SCREEN_BUNDLE, copy)
    weights = copy / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="integrity check"):
        load_bundle(copy)


def test_missing_bundle_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not a model bundle"):
        load_bundle(tmp_path)


def test_threshold_override_from_config_wins() -> None:
    bundle = load_bundle(CONFIRM_BUNDLE, {"pneumonia": 0.9})
    assert bundle.thresholds["pneumonia"] == 0.9
