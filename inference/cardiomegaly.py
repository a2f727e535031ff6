"""Cardiomegaly (SNOMED CT 8186001), a finding derived from the cardiothoracic ratio.

No classifier: the segmentation measures the ratio (:mod:`inference.anatomy`), and the
segment bundle carries a logistic fit of the cardiomegaly label against the ratio on
pooled out-of-fold predictions (:mod:`inference.train_segment`) — the calibrated
probability. The finding is *present* when the ratio exceeds the configured threshold
(0.50 by default, the classic Danzer criterion the training labels follow).

Only PA films are assessed. On an AP film the heart lies further from the detector and
is magnified (and AP films are taken of patients who cannot stand, often supine, which
widens the mediastinum), so a ratio above 0.50 is common without cardiomegaly; the
training data carries no view labels to validate an AP threshold, so AP — and films
whose view is not stated — are *not assessed*, with that reason. The segment bundle's
population (adults) applies as for any other finding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from inference.anatomy import Anatomy
from inference.bundle import Bundle, Label
from inference.findings import Finding, NotAssessed
from inference.population import ImageFacts

NAME = "cardiomegaly"
DEFAULT_RATIO = 0.5
STAGE = "measurement"


@dataclass(frozen=True)
class CardiomegalyRule:
    """The calibration and threshold in force, and the model they belong to."""

    label: Label
    slope: float
    intercept: float
    ratio_threshold: float
    model_name: str
    model_version: str

    @classmethod
    def from_bundle(cls, bundle: Bundle, ratio_threshold: float | None = None) -> CardiomegalyRule:
        spec: dict[str, Any] = bundle.metadata["cardiomegaly"]
        return cls(
            Label(NAME, spec["code"], spec["scheme"], spec["meaning"]),
            float(spec["logistic"]["slope"]),
            float(spec["logistic"]["intercept"]),
            float(spec["ratio_threshold"] if ratio_threshold is None else ratio_threshold),
            bundle.name,
            bundle.version,
        )

    def probability(self, ratio: float) -> float:
        return 1.0 / (1.0 + math.exp(-(self.slope * ratio + self.intercept)))

    def not_assessed(self, reason: str) -> NotAssessed:
        return NotAssessed(self.label, reason, self.model_name, self.model_version)

    def assess(self, anatomy: Anatomy | None, facts: ImageFacts) -> Finding | NotAssessed:
        if anatomy is None:
            return self.not_assessed("no heart and lung segmentation for this image")
        if not anatomy.assessed or anatomy.ctr is None:
            return self.not_assessed(anatomy.reason or "cardiothoracic ratio not measured")
        if facts.view != "PA":
            shown = f"{facts.view} view" if facts.view else "view not stated"
            return self.not_assessed(
                f"{shown}: the cardiothoracic ratio threshold holds for PA films only "
                "(the heart is magnified on AP films)"
            )
        return Finding(
            self.label,
            self.probability(anatomy.ctr),
            anatomy.ctr > self.ratio_threshold,
            STAGE,
            self.probability(self.ratio_threshold),
            self.model_name,
            self.model_version,
        )
