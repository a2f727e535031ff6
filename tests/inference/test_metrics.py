"""The metrics the training commands, ``models performance`` and ``models calibrate``
share (inference/metrics.py), against scikit-learn and their definitions."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from inference.metrics import auroc_delong, fit_temperature, threshold_for_sensitivity


def test_threshold_calls_exactly_the_positives_the_target_needs() -> None:
    labels = np.array([True] * 10 + [False] * 5)
    probs = np.linspace(0.1, 1.0, 15)
    threshold = threshold_for_sensitivity(labels, probs, 0.9)  # 0.9 * 10 is 9.000…02
    assert (probs[labels] >= threshold).sum() == 9
    assert (probs[labels] >= threshold_for_sensitivity(labels, probs, 1.0)).sum() == 10
    # Positives that can never be called (-inf) count as misses.
    unreachable = np.where(np.arange(15) == 0, -np.inf, probs)
    assert (unreachable[labels] >= threshold_for_sensitivity(labels, unreachable, 0.9)).sum() == 9


def test_delong_auroc_is_sklearn_s_with_an_interval_around_it() -> None:
    rng = np.random.default_rng(0)
    labels = rng.random(300) < 0.3
    scores = rng.random(300) + labels * 0.5
    auc, (low, high) = auroc_delong(labels, scores)
    assert auc == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert low < auc < high and high - low < 0.15


def test_temperature_recovers_the_scale_of_the_logits() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(size=20_000) * 3
    labels = rng.random(20_000) < 1 / (1 + np.exp(-logits / 3))
    assert abs(fit_temperature(logits, labels) - 3.0) < 0.2
