"""Evaluation of the shipped cascade on a labelled folder; the metrics themselves live
in :mod:`inference.metrics` (re-exported here for the training commands)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from inference import metrics
from inference.metrics import (
    BinaryMetrics,
    auroc,
    binary_metrics,
    expected_calibration_error,
    threshold_for_sensitivity,
    threshold_youden,
)

__all__ = [
    "BinaryMetrics",
    "auroc",
    "binary_metrics",
    "expected_calibration_error",
    "fit_temperature",
    "threshold_for_sensitivity",
    "threshold_youden",
]


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature scaling (see :func:`inference.metrics.fit_temperature`)."""
    return metrics.fit_temperature(logits, labels)


def evaluate_folder(data: Path, limit: int | None = None, batch: int = 32) -> dict[str, Any]:
    """Metrics of the shipped bundles on a labelled folder (``labels.csv``: path,label).

    Reports each network alone (at its own threshold) and the cascade's final call, the
    way the node reports it: confirm probability where the screen passed the image on,
    screen probability (called absent) where it did not.
    """
    from inference.cascade import Cascade
    from inference.datasets import load_labelled
    from inference.decode import DecodedImage

    split = load_labelled(data, limit)
    cascade = Cascade.load(heatmaps=False)
    results = []
    for start in range(0, len(split.labels), batch):
        images = [
            DecodedImage(img.astype(np.float32) / 255.0, None, None, "jpeg")
            for img in split.images[start : start + batch]
        ]
        results.extend(cascade.analyze_pixels(images))
    final = np.array([r.findings[0].probability if r.findings else np.nan for r in results])
    present = np.array([bool(r.findings and r.findings[0].present) for r in results])
    labels = split.labels.astype(bool)
    scored = ~np.isnan(final)
    return {
        "images": int(len(labels)),
        "not_scored_by_gate": int((~scored).sum()),
        "cascade": {
            "auroc": round(auroc(labels[scored], final[scored]), 4),
            "sensitivity": round(float((present & labels).sum() / max(1, labels.sum())), 4),
            "specificity": round(float((~present & ~labels).sum() / max(1, (~labels).sum())), 4),
            "accuracy": round(float((present == labels).mean()), 4),
            "ece": round(expected_calibration_error(labels[scored], final[scored]), 4),
        },
    }


def main(argv: list[str] | None = None) -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(description="Evaluate the shipped bundles on a folder.")
    parser.add_argument("--data", required=True, type=Path, help="folder with labels.csv")
    parser.add_argument("--limit", type=int)
    args = parser.parse_args(argv)
    print(json.dumps(evaluate_folder(args.data, args.limit), indent=2))


if __name__ == "__main__":
    main()
