"""Two model versions on the same images: agreement, flips, score correlation, and both
against the labelled cases they share.

Typically the active version and its shadow: both answered every image the active one
scored, so the comparison is paired. Only images both versions assessed count.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from scipy import stats
from sqlalchemy.orm import Session

from dicom_node.models.performance import assess
from dicom_node.models.registry import parse_ref
from storage import registry as rows


def compare(session: Session, first: str, second: str) -> dict[str, Any]:
    """``first`` and ``second`` as NAME@VERSION; one entry per finding they share."""
    a_name, a_version = parse_ref(first)
    b_name, b_version = parse_ref(second)
    a = _latest(rows.scores(session, model=a_name, version=a_version))
    b = _latest(rows.scores(session, model=b_name, version=b_version))
    labels = {
        (row.sop_instance_uid, row.finding_code): label
        for row, label in rows.labelled_scores(session)
    }
    findings = []
    for code in sorted({key[1] for key in a} & {key[1] for key in b}):
        paired = sorted(key for key in a.keys() & b.keys() if key[1] == code)
        findings.append(_compare_finding(code, paired, a, b, labels))
    return {"a": first, "b": second, "findings": findings}


def _latest(found: list[Any]) -> dict[tuple[str, str], Any]:
    """(SOP instance, finding) → the newest score (active and shadow rows of the same
    version answer the same; the newer one is kept)."""
    latest: dict[tuple[str, str], Any] = {}
    for row in sorted(found, key=lambda r: r.id):
        latest[(row.sop_instance_uid, row.finding_code)] = row
    return latest


def _compare_finding(
    code: str,
    paired: list[tuple[str, str]],
    a: Mapping[tuple[str, str], Any],
    b: Mapping[tuple[str, str], Any],
    labels: Mapping[tuple[str, str], bool],
) -> dict[str, Any]:
    calls_a = np.array([bool(a[k].present) for k in paired], dtype=bool)
    calls_b = np.array([bool(b[k].present) for k in paired], dtype=bool)
    probs_a = np.array([a[k].probability for k in paired], dtype=np.float64)
    probs_b = np.array([b[k].probability for k in paired], dtype=np.float64)
    n = len(paired)
    entry: dict[str, Any] = {
        "finding_code": code,
        "n_paired": n,
        "agreement": round(float((calls_a == calls_b).mean()), 4) if n else None,
        "flips": {
            "absent_to_present": int((~calls_a & calls_b).sum()),
            "present_to_absent": int((calls_a & ~calls_b).sum()),
        },
        "pearson": _correlation(stats.pearsonr, probs_a, probs_b),
        "spearman": _correlation(stats.spearmanr, probs_a, probs_b),
    }
    labelled = [i for i, key in enumerate(paired) if key in labels]
    truth = np.array([labels[paired[i]] for i in labelled], dtype=bool)
    for side, probs, calls in (("a", probs_a, calls_a), ("b", probs_b, calls_b)):
        entry[f"performance_{side}"] = (
            assess(truth, probs[labelled], calls[labelled], None) if labelled else None
        )
    return entry


def _correlation(test: Any, x: np.ndarray, y: np.ndarray) -> float | None:
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return round(float(test(x, y)[0]), 4)
