"""Live performance: each model version against this site's readers, beside its card.

For every (finding, model version, role) with labelled cases: AUROC with its 95 % DeLong
interval, sensitivity and specificity of the calls the version made (at its threshold,
as recorded on each score) with Wilson intervals, prevalence and ECE. The card's
validated figures come with it; a version is *below its card* when the card's AUROC
lies above the live interval's upper bound, or its sensitivity above the live
sensitivity's — judged only with at least ``MIN_PER_CLASS`` labelled cases of each
class, so a handful of labels raises no alarm.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from inference import metrics
from storage import registry as rows

MIN_PER_CLASS = 10
ECE_BINS = 10
Key = tuple[str, str, str, str]  # finding code, model, version, role


def card_figures(card: Mapping[str, Any] | None, finding_code: str) -> dict[str, Any] | None:
    """The validated AUROC / sensitivity / specificity a card states for a finding."""
    if not card:
        return None
    evaluated = card.get("eval_metrics") or {}
    for source in ("site", "validation"):
        figures = evaluated.get(source)
        if isinstance(figures, Mapping) and figures.get("auroc") is not None:
            return {
                "source": source,
                "auroc": figures.get("auroc"),
                "sensitivity": figures.get("sensitivity"),
                "specificity": figures.get("specificity"),
            }
    cross = evaluated.get("cross_validation") or {}
    cardiomegaly = (card.get("cardiomegaly") or {}).get("code")
    auroc = (cross.get("cardiomegaly_auroc") or {}).get("mean")
    if finding_code == cardiomegaly and auroc is not None:
        return {"source": "cross_validation", "auroc": auroc}
    return None


def assess(
    labels: np.ndarray, probabilities: np.ndarray, calls: np.ndarray, threshold: float | None
) -> dict[str, Any]:
    """The figures of one version on its labelled cases."""
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    auroc, ci = metrics.auroc_delong(labels, probabilities)
    tp, tn = int((calls & labels).sum()), int((~calls & ~labels).sum())
    return {
        "n_labelled": int(len(labels)),
        "n_positive": n_pos,
        "n_negative": n_neg,
        "prevalence": _r(n_pos / len(labels)) if len(labels) else None,
        "auroc": _r(auroc),
        "auroc_ci": [_r(ci[0]), _r(ci[1])],
        "threshold": threshold,
        "sensitivity": _r(tp / n_pos) if n_pos else None,
        "sensitivity_ci": [_r(v) for v in metrics.wilson_ci(tp, n_pos)],
        "specificity": _r(tn / n_neg) if n_neg else None,
        "specificity_ci": [_r(v) for v in metrics.wilson_ci(tn, n_neg)],
        "ece": _r(metrics.expected_calibration_error(labels, probabilities, ECE_BINS)),
    }


def below_card(live: Mapping[str, Any], card: Mapping[str, Any] | None) -> str | None:
    """Why the live figures are significantly below the card's (None: they are not,
    or there are too few labelled cases to say)."""
    if card is None or min(live["n_positive"], live["n_negative"]) < MIN_PER_CLASS:
        return None
    reasons = []
    upper = live["auroc_ci"][1]
    if card.get("auroc") is not None and upper is not None and card["auroc"] > upper:
        reasons.append(
            f"AUROC {live['auroc']:.3f} (95 % CI up to {upper:.3f}) < card {card['auroc']:.3f}"
        )
    upper = live["sensitivity_ci"][1]
    if card.get("sensitivity") is not None and upper is not None and card["sensitivity"] > upper:
        reasons.append(
            f"sensitivity {live['sensitivity']:.3f} (95 % CI up to {upper:.3f}) "
            f"< card {card['sensitivity']:.3f}"
        )
    return "; ".join(reasons) or None


def performance(
    session: Session,
    cards: Mapping[tuple[str, str], Mapping[str, Any]],
    finding_code: str | None = None,
) -> list[dict[str, Any]]:
    """One entry per (finding, model version, role) with labelled cases, sorted."""
    grouped: dict[Key, list[tuple[Any, bool]]] = defaultdict(list)
    for row, label in rows.labelled_scores(session, finding_code):
        grouped[(row.finding_code, row.model, row.version, row.role)].append((row, label))
    report = []
    for (code, model, version, role), cases in sorted(grouped.items()):
        labels = np.array([label for _row, label in cases], dtype=bool)
        probabilities = np.array([row.probability for row, _label in cases], dtype=np.float64)
        calls = np.array([bool(row.present) for row, _label in cases], dtype=bool)
        thresholds = [row.threshold for row, _label in cases if row.threshold is not None]
        threshold = max(set(thresholds), key=thresholds.count) if thresholds else None
        live = assess(labels, probabilities, calls, threshold)
        card = card_figures(cards.get((model, version)), code)
        warning = below_card(live, card)
        report.append(
            {
                "finding_code": code,
                "model": model,
                "version": version,
                "role": role,
                **live,
                "card": card,
                "below_card": warning is not None,
                "warning": warning,
            }
        )
    return report


def _r(value: float | None) -> float | None:
    if value is None or not np.isfinite(value):
        return None
    return round(float(value), 4)
