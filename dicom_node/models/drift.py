"""Drift: what each model version sees and answers now, against what it was built on.

For every version in force (active and shadow) the rolling window is its latest
``WINDOW_MAX`` scores of the last ``WINDOW_DAYS`` days. Each signal — the finding's
probability, the gate distance, the share refused, and the input descriptors (age, sex,
view, manufacturer, pixel spacing, photometric interpretation, bits stored) — is
compared with the reference the bundle stores from its training data
(:mod:`inference.reference`): population stability index plus a chi-square two-sample
test, ``ok`` / ``warn`` / ``alert`` by the bands documented there.

A descriptor the training data did not record (JPEG and PNG sets have no DICOM header)
has no bundle reference; it is compared with the *site baseline* — the first
``BASELINE_N`` images this version scored here — so a later change of scanner or
population still shows, and the entry says which reference it used. A signal with
fewer than ``MIN_N`` live values is not reported: too few to tell.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from dicom_node.config import Settings
from dicom_node.model_bundles import configured_bundles
from dicom_node.models.registry import finding_of, plan, slot_of
from inference import reference as ref
from inference.manifest import BundleError, read_metadata
from storage import registry as rows
from storage.models import utcnow
from storage.registry import ACTIVE, SHADOW

WINDOW_DAYS = 7
WINDOW_MAX = 1000
MIN_N = 50
BASELINE_N = 200
LEVELS = ("ok", "warn", "alert")


@dataclass(frozen=True)
class Monitored:
    """A version in force whose answers are watched."""

    finding_code: str
    model: str
    version: str
    role: str  # "active" | "shadow"
    path: Path


def monitored(settings: Settings, session: Session) -> list[Monitored]:
    """The decision model of each finding in force (confirm, segment) and the shadows."""
    current = plan(settings, session)
    found = []
    for bundle in configured_bundles(settings):
        finding, role = slot_of(bundle)
        if role == "screen":
            continue
        version = current.versions.get((finding, role))
        path = Path(version.path) if version is not None else bundle.path
        entry = _entry(path, ACTIVE)
        if entry is not None:
            found.append(entry)
    for shadow in current.shadows:
        v = shadow.version
        found.append(Monitored(v.finding_code, v.name, v.version, SHADOW, Path(v.path)))
    return found


def _entry(path: Path, role: str) -> Monitored | None:
    try:
        meta = read_metadata(path)
    except BundleError:
        return None
    answered = finding_of(meta)
    if answered is None:
        return None
    return Monitored(answered[1], str(meta["name"]), str(meta["version"]), role, path)


def drift(session: Session, versions: Sequence[Monitored]) -> list[dict[str, Any]]:
    """One entry per (version, signal) with enough live data."""
    since = utcnow() - timedelta(days=WINDOW_DAYS)
    report = []
    for watched in versions:
        reference = ref.read_reference(watched.path) or {"signals": {}}
        key = (watched.model, watched.version, watched.role, watched.finding_code)
        live = rows.window(session, *key, limit=WINDOW_MAX, since=since)
        if len(live) < MIN_N:
            continue
        baseline: _Baseline | None = None
        for signal, values in _signals(live).items():
            stored = reference["signals"].get(_reference_key(signal, watched.finding_code))
            source = "bundle"
            current = values
            if stored is None:
                baseline = baseline or _Baseline.read(session, key)
                if not baseline.complete:
                    continue
                current = [
                    v for row, v in zip(live, values, strict=True) if row.id not in baseline.ids
                ]
                if len(current) < MIN_N:
                    continue
                stored = _reference_of(signal, baseline.signals[signal])
                source = "site_baseline"
            entry = _compare(stored, [v for v in current if v is not None])
            if entry is None:
                continue
            report.append(
                {
                    "model": watched.model,
                    "version": watched.version,
                    "role": watched.role,
                    "finding_code": watched.finding_code,
                    "signal": signal,
                    "reference": source,
                    **entry,
                }
            )
    return report


@dataclass(frozen=True)
class _Baseline:
    """The first ``BASELINE_N`` scores a version made here: its ids and signals."""

    ids: frozenset[int]
    signals: dict[str, list[Any]]

    @property
    def complete(self) -> bool:
        return len(self.ids) >= BASELINE_N

    @classmethod
    def read(cls, session: Session, key: tuple[str, str, str, str]) -> _Baseline:
        first = rows.window(session, *key, limit=BASELINE_N, oldest=True)
        return cls(frozenset(row.id for row in first), _signals(first))


def _signals(window: Sequence[Any]) -> dict[str, list[Any]]:
    """Each signal's value per window row, in row order (None: not known)."""
    return {
        "probability": [row.probability if row.assessed else None for row in window],
        "gate_distance": [row.ood_distance for row in window],
        "refused": ["yes" if row.refused else "no" for row in window],
        **{name: [_descriptor(row, name) for row in window] for name in ref.SIGNALS_DESCRIPTORS},
    }


def _descriptor(row: Any, name: str) -> Any:
    value = getattr(row, name)
    if name in ref.NUMERIC_DESCRIPTORS:
        return value
    return ref.UNKNOWN if value is None else value


def _reference_key(signal: str, code: str) -> str:
    return ref.probability_signal(code) if signal == "probability" else signal


def _reference_of(signal: str, values: Sequence[Any]) -> dict[str, Any]:
    if signal in ("probability", "gate_distance", *ref.NUMERIC_DESCRIPTORS):
        return ref.numeric_reference([v for v in values if v is not None])
    return ref.categorical_reference(list(values))


def _compare(stored: Mapping[str, Any], values: Sequence[Any]) -> dict[str, Any] | None:
    if len(values) < MIN_N or not stored.get("n"):
        return None
    counts = ref.live_counts(stored, values)
    psi = ref.psi(stored, counts)
    p_value = ref.two_sample_p(stored, counts)
    return {
        "level": ref.level(psi, p_value),
        "psi": round(psi, 4),
        "p_value": float(f"{p_value:.3g}"),
        "n": len(values),
        "reference_n": int(stored["n"]),
        "plot": _plot(stored, counts),
    }


def _plot(stored: Mapping[str, Any], counts: Any) -> dict[str, Any]:
    """Bins with the reference's and the live proportions (the dashboard's bars)."""
    if stored["kind"] == "numeric":
        edges = [float(e) for e in stored["edges"]]
        bounds = _distinct_labels(edges)
        labels = (
            [f"≤{bounds[0]}"]
            + [f"{a}–{b}" for a, b in zip(bounds, bounds[1:], strict=False)]
            + [f">{bounds[-1]}"]
            if edges
            else ["all"]
        )
        reference_counts = list(stored["counts"])
        live_counts = list(counts)
    else:
        labels = sorted(set(stored["counts"]) | set(counts))
        reference_counts = [stored["counts"].get(k, 0) for k in labels]
        live_counts = [counts.get(k, 0) for k in labels]
    return {
        "bins": labels,
        "reference": _shares(reference_counts),
        "live": _shares(live_counts),
    }


def _distinct_labels(edges: Sequence[float]) -> list[str]:
    """The shortest rounding that keeps neighbouring edges apart (probabilities pile up
    just below 1: 0.99994 and 0.99998 must not both read "1")."""
    for digits in range(3, 10):
        labels = [f"{e:.{digits}g}" for e in edges]
        exact = all(
            float(label) != round(e) or e == round(e)
            for e, label in zip(edges, labels, strict=True)
        )
        if len(set(labels)) == len(labels) and exact:
            return labels
    return [repr(e) for e in edges]


def _shares(counts: Sequence[int]) -> list[float]:
    total = sum(counts) or 1
    return [round(c / total, 4) for c in counts]


def worst(entries: Sequence[Mapping[str, Any]]) -> str:
    """The most severe level among ``entries`` ("ok" when there are none)."""
    return max((e["level"] for e in entries), key=LEVELS.index, default="ok")
