"""One epoch on a few images: the training command still produces loadable bundles."""

from __future__ import annotations

from pathlib import Path

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
