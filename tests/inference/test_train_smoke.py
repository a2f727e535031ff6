"""One epoch on a few images: the training command still produces loadable bundles."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from inference.bundle import load_bundle
from inference.train import main


def test_one_epoch_smoke_training_writes_verified_bundles(
    kermany_dir: Path, tmp_path: Path
) -> None:
    main(
        [
            "--data",
            str(kermany_dir),
            "--limit",
            "96",
            "--epochs",
            "1",
            "--workers",
            "0",
            "--out",
            str(tmp_path),
        ]
    )
    for name in ("cxr_pneumonia_screen_mobilenetv3", "cxr_pneumonia_confirm_resnet18"):
        bundle = load_bundle(tmp_path / name)
        assert bundle.labels[0].code == "233604007"
        assert 0.0 <= bundle.thresholds["pneumonia"] <= 1.0
    assert len(load_bundle(tmp_path / "cxr_pneumonia_screen_mobilenetv3").gate["distance"]) == 2


def test_segmentation_trainer_cross_validates_and_writes_a_loadable_bundle(
    tmp_path: Path,
) -> None:
    """Two folds, one epoch, 24 images: the figures and the calibration reach the
    bundle, and the bundle serves as the segment stage."""
    import json

    from inference import train_segment
    from inference.segment import Segmenter
    from tests.inference.conftest import data_root

    out = tmp_path / "segment"
    train_segment.main(
        [
            "--data",
            str(data_root() / "cxr-anatomy"),
            "--limit",
            "24",
            "--folds",
            "2",
            "--epochs",
            "1",
            "--size",
            "64",
            "--threads",
            "1",
            "--work",
            str(tmp_path / "work"),
            "--out",
            str(out),
        ]
    )
    cv = json.loads((tmp_path / "work" / "cv.json").read_text())
    assert len(cv["folds"]) == 2 and 0.0 <= cv["dice_heart"]["mean"] <= 1.0
    segmenter = Segmenter.load(out)
    assert segmenter.bundle.role == "segment" and segmenter.bundle.input_size == 64
    meta = segmenter.bundle.metadata
    assert meta["cardiomegaly"]["code"] == "8186001"
    assert meta["eval_metrics"]["cross_validation"]["ctr_mae"]["mean"] >= 0
    noise = np.random.default_rng(0).random((100, 80), dtype=np.float32)
    (masks,) = segmenter.masks([noise])
    assert masks.shape == (3, 64, 64) and masks.dtype == bool
    assert "Dice heart" in (out / "docs" / "README.md").read_text()
