"""What the node says about one finding on one image: assessed (with a probability) or not.

Every finding in force is accounted for on every image: a :class:`Finding` when a model
assessed it — the probability of the stage that made the final call — or a
:class:`NotAssessed` with the reason (outside the validated population, image refused,
anatomy not measurable). Both classifier findings (:mod:`inference.cascade`) and findings
derived from measurements (:mod:`inference.cardiomegaly`) report through these.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from inference.bundle import Label

ASSESSED, NOT_ASSESSED = "assessed", "not_assessed"


@dataclass(frozen=True)
class Finding:
    """An assessed finding: the probability of the stage that made the final call."""

    label: Label
    probability: float
    present: bool
    stage: str  # "screen" | "confirm" | "measurement"
    threshold: float
    model_name: str  # the bundle that made the call (TID 4019 Algorithm Name)
    model_version: str  # its version (TID 4019 Algorithm Version)
    # Explanation check: share of the Grad-CAM mass inside the lung fields and the heart
    # (only for the finding the heatmap was computed for, when the anatomy is known).
    cam_lung_share: float | None = None
    cam_heart_share: float | None = None

    def as_dict(self) -> dict[str, Any]:
        shares = {
            key: round(value, 4)
            for key, value in (
                ("cam_lung_share", self.cam_lung_share),
                ("cam_heart_share", self.cam_heart_share),
            )
            if value is not None
        }
        return {
            "code": self.label.code,
            "scheme": self.label.scheme,
            "meaning": self.label.meaning,
            "status": ASSESSED,
            "reason": None,
            "probability": round(self.probability, 6),
            "present": self.present,
            "stage": self.stage,
            "threshold": round(self.threshold, 6),
            "model": f"{self.model_name} {self.model_version}",
            **shares,
        }


@dataclass(frozen=True)
class NotAssessed:
    """A finding in force that was not assessed on this image, and why (no probability)."""

    label: Label
    reason: str
    model_name: str
    model_version: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "code": self.label.code,
            "scheme": self.label.scheme,
            "meaning": self.label.meaning,
            "status": NOT_ASSESSED,
            "reason": self.reason,
            "present": False,
            "model": f"{self.model_name} {self.model_version}",
        }
