"""What each model version answered on each image, flattened for monitoring.

Every finding in force gets a row per image, assessed or not: the probability, the call
and the threshold it was made at when assessed; otherwise ``refused``. The row names the
finding's *decision model* — for a classifier finding the confirm bundle, whose
threshold makes the call (the screen only triages), for cardiomegaly the segmentation
bundle — so that live performance, comparison and recalibration address one version.
A shadow row names the candidate itself. The input descriptors go with every row.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from inference.cascade import SCORED, ImageResult
from storage.models import ModelScore

Decision = Mapping[str, tuple[str, str]]  # finding code → (model name, version)


def score_rows(
    result: ImageResult,
    *,
    instance_id: int,
    sop_instance_uid: str,
    study_instance_uid: str,
    descriptors: Mapping[str, Any],
    decision: Decision,
    role: str,
    only: tuple[str, str, str] | None = None,
) -> list[ModelScore]:
    """Rows for ``result``; ``only`` = (finding code, model, version) keeps that
    finding and names that model (a shadow run's candidate)."""
    rows = []
    scored = result.status == SCORED
    entries: list[tuple[str, Any]] = [(f.label.code, f) for f in result.findings]
    entries += [(n.label.code, None) for n in result.not_assessed]
    for code, finding in entries:
        if only is not None and code != only[0]:
            continue
        if only is not None:
            model, version = only[1], only[2]
        elif code in decision:
            model, version = decision[code]
        elif finding is not None:
            model, version = finding.model_name, finding.model_version
        else:
            continue
        rows.append(
            ModelScore(
                instance_id=instance_id,
                sop_instance_uid=sop_instance_uid,
                study_instance_uid=study_instance_uid,
                finding_code=code,
                model=model,
                version=version,
                role=role,
                assessed=finding is not None,
                probability=None if finding is None else float(finding.probability),
                present=None if finding is None else bool(finding.present),
                threshold=None if finding is None else float(finding.threshold),
                stage=None if finding is None else finding.stage,
                refused=finding is None or not scored,
                ood_distance=result.ood_distance,
                **_descriptor_columns(descriptors),
            )
        )
    return rows


def _descriptor_columns(descriptors: Mapping[str, Any]) -> dict[str, Any]:
    def text(key: str, length: int) -> str | None:
        value = descriptors.get(key)
        return None if value is None else str(value)[:length]

    def number(key: str) -> float | None:
        value = descriptors.get(key)
        return None if value is None else float(value)

    return {
        "age": number("age"),
        "sex": text("sex", 16),
        "view": text("view", 16),
        "manufacturer": text("manufacturer", 64),
        "pixel_spacing": number("pixel_spacing"),
        "photometric": text("photometric", 16),
        "bits": text("bits", 8),
    }
