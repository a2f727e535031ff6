"""Metrics for binary findings, and the calibration and threshold choices made from them.

Kept dependency-free (numpy/torch only) so the node can recompute them from a bundle
without the training extras.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve via the Mann-Whitney U statistic (ties count half)."""
    labels = np.asarray(labels).astype(bool)
    ranks = _average_ranks(np.asarray(scores, dtype=np.float64))
    n_pos, n_neg = labels.sum(), (~labels).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_vals = values[order]
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and sorted_vals[j + 1] == sorted_vals[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, bins: int = 15) -> float:
    """ECE with equal-width bins (Guo et al. 2017)."""
    labels = np.asarray(labels, dtype=np.float64)
    probs = np.asarray(probs, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(probs, edges[1:-1]), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        mask = idx == b
        if mask.any():
            ece += mask.mean() * abs(probs[mask].mean() - labels[mask].mean())
    return float(ece)


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature scaling: the single T minimising validation NLL of sigmoid(logit / T)."""
    z = torch.as_tensor(logits, dtype=torch.float64)
    y = torch.as_tensor(labels, dtype=torch.float64)
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.exp().item())


def threshold_for_sensitivity(labels: np.ndarray, probs: np.ndarray, target: float) -> float:
    """Highest threshold whose sensitivity (prob >= threshold) is at least ``target``."""
    positives = np.sort(np.asarray(probs)[np.asarray(labels).astype(bool)])
    allowed_misses = int(np.floor((1.0 - target) * len(positives)))
    return float(positives[allowed_misses])


def threshold_youden(labels: np.ndarray, probs: np.ndarray) -> float:
    """Threshold maximising sensitivity + specificity - 1 on the given set."""
    labels = np.asarray(labels).astype(bool)
    best, best_j = 0.5, -1.0
    for t in np.unique(probs):
        pred = probs >= t
        j = (pred & labels).sum() / labels.sum() + (~pred & ~labels).sum() / (~labels).sum() - 1
        if j > best_j:
            best, best_j = float(t), float(j)
    return best


@dataclass(frozen=True)
class BinaryMetrics:
    n: int
    prevalence: float
    auroc: float
    sensitivity: float
    specificity: float
    accuracy: float
    ece: float
    threshold: float

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


def binary_metrics(labels: np.ndarray, probs: np.ndarray, threshold: float) -> BinaryMetrics:
    labels = np.asarray(labels).astype(bool)
    pred = np.asarray(probs) >= threshold
    return BinaryMetrics(
        n=int(len(labels)),
        prevalence=float(labels.mean()),
        auroc=auroc(labels, probs),
        sensitivity=float((pred & labels).sum() / max(1, labels.sum())),
        specificity=float((~pred & ~labels).sum() / max(1, (~labels).sum())),
        accuracy=float((pred == labels).mean()),
        ece=expected_calibration_error(labels, probs),
        threshold=float(threshold),
    )


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
