"""Metrics for binary findings, their confidence intervals, and the calibration and
threshold choices made from them.

numpy and scipy only: training, evaluation and the node's live monitoring (``models
performance``, ``models calibrate``) compute the same figures the same way, and the
node pays no torch import for them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import optimize, stats

Z95 = float(stats.norm.ppf(0.975))


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


def threshold_for_sensitivity(labels: np.ndarray, probs: np.ndarray, target: float) -> float:
    """Highest threshold whose sensitivity (prob >= threshold) is at least ``target``."""
    positives = np.sort(np.asarray(probs)[np.asarray(labels).astype(bool)])
    # ceil(target * n) positives must be called; the epsilon keeps float error (0.9 * 10
    # = 9.000000000000002) from demanding one more than the target needs.
    allowed_misses = len(positives) - max(1, math.ceil(target * len(positives) - 1e-9))
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


def auroc_delong(labels: np.ndarray, scores: np.ndarray) -> tuple[float, tuple[float, float]]:
    """AUROC and its 95 % confidence interval by DeLong's method (DeLong et al. 1988,
    with the midrank computation of Sun & Xu 2014): deterministic, unlike a bootstrap,
    and exact enough for the few hundred labelled cases a site collects."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    positives, negatives = scores[labels], scores[~labels]
    m, n = len(positives), len(negatives)
    if m == 0 or n == 0:
        return float("nan"), (float("nan"), float("nan"))
    tx = _average_ranks(positives)
    ty = _average_ranks(negatives)
    tz = _average_ranks(np.concatenate([positives, negatives]))
    auc = float((tz[:m].sum() - m * (m + 1) / 2) / (m * n))
    v10 = (tz[:m] - tx) / n
    v01 = 1.0 - (tz[m:] - ty) / m
    variance = (np.var(v10, ddof=1) / m if m > 1 else 0.0) + (
        np.var(v01, ddof=1) / n if n > 1 else 0.0
    )
    half = Z95 * math.sqrt(max(float(variance), 0.0))
    return auc, (max(0.0, auc - half), min(1.0, auc + half))


def wilson_ci(successes: int, total: int) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion (sensitivity, specificity)."""
    if total == 0:
        return float("nan"), float("nan")
    p = successes / total
    denominator = 1 + Z95**2 / total
    centre = (p + Z95**2 / (2 * total)) / denominator
    half = Z95 * math.sqrt(p * (1 - p) / total + Z95**2 / (4 * total**2)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature scaling: the single T minimising the NLL of sigmoid(logit / T)
    (Guo et al. 2017), searched on log T in [1/100, 100]."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)

    def nll(log_t: float) -> float:
        s = z / math.exp(log_t)
        return float(np.mean(np.logaddexp(0.0, s) - y * s))

    found = optimize.minimize_scalar(nll, bounds=(-math.log(100), math.log(100)), method="bounded")
    return float(math.exp(found.x))


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-7, 1 - 1e-7)
    return np.asarray(np.log(p / (1 - p)))
