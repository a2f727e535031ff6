"""The models' health in one call, for ``status``, ``/metrics`` and the dashboard: drift
of every version in force, and the versions whose live performance is significantly
below their card."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from dicom_node.config import Settings
from dicom_node.models import registry
from dicom_node.models.drift import drift, monitored
from dicom_node.models.performance import performance

STATUS_KEYS = (
    "model",
    "version",
    "role",
    "finding_code",
    "signal",
    "level",
    "psi",
    "p_value",
    "n",
    "reference",
)


@dataclass
class ModelHealth:
    drift: list[dict[str, Any]] = field(default_factory=list)
    performance: list[dict[str, Any]] = field(default_factory=list)

    def warnings(self) -> list[str]:
        """One line per version below its card, and per signal drifting (warn/alert)."""
        lines = [
            f"{p['model']}@{p['version']} ({p['role']}) {p['finding_code']}: below its card: "
            f"{p['warning']}"
            for p in self.performance
            if p["below_card"]
        ]
        lines += [
            f"{d['model']}@{d['version']} ({d['role']}) {d['finding_code']}: {d['signal']} "
            f"drift {d['level']} (PSI {d['psi']}, p={d['p_value']}, n={d['n']}, "
            f"against the {d['reference'].replace('_', ' ')})"
            for d in self.drift
            if d["level"] != "ok"
        ]
        return lines

    def status_drift(self) -> list[dict[str, Any]]:
        """``status --json``'s ``drift``: the entries without their plot data."""
        return [{key: d[key] for key in STATUS_KEYS} for d in self.drift]


def model_health(settings: Settings, session: Session) -> ModelHealth:
    return ModelHealth(
        drift=drift(session, monitored(settings, session)),
        performance=performance(session, registry.cards(settings, session)),
    )
