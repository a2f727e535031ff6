"""Site recalibration: a derived version whose probabilities and threshold fit this site.

On the labelled cases of the finding's active decision model, a temperature ``T`` is
fitted on the logit of the probabilities the model reported (``p' = sigmoid(logit(p) /
T)``, Guo et al. 2017: it changes confidence, never the ranking), and the threshold is
the highest one whose sensitivity on those cases reaches the target. Both come with 95 %
intervals (bootstrap of the cases for ``T`` and the threshold, Wilson for sensitivity
and specificity, DeLong for AUROC). The weights are not touched.

* A classifier finding's decision model is its confirm bundle: only cases the screen
  passed to it carry a confirm probability; the others were called absent by the screen
  and stay so, which caps the sensitivity reachable — a target above that cap is
  refused, with the cap.
* Cardiomegaly's decision model is the segmentation bundle's logistic on the
  cardiothoracic ratio: the temperature scales its slope and intercept, and the
  threshold becomes the ratio at which the recalibrated probability reaches it.

The derived bundle (version ``<parent>+site.<k>``, provenance: parent name@version and
weights sha256, cases, date, target) is installed into the registry like any other; it
runs only once shadowed or activated.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from dicom_node.config import Settings
from dicom_node.models import registry
from dicom_node.models.drift import monitored
from dicom_node.models.performance import assess
from inference import metrics
from inference.manifest import read_metadata
from storage import registry as rows
from storage.models import ModelVersion
from storage.registry import ACTIVE

MIN_PER_CLASS = 20
BOOTSTRAP = 200
CARD = "docs/README.md"


@dataclass(frozen=True)
class Fit:
    temperature: float
    threshold: float  # on the recalibrated probability


def calibrate(
    session: Session,
    settings: Settings,
    finding_code: str,
    target_sensitivity: float,
    *,
    actor: str,
) -> tuple[ModelVersion, dict[str, Any]]:
    """Fit, write and install the derived version; returns it and the fit's report."""
    if not 0.0 < target_sensitivity < 1.0:
        raise registry.RegistryError("--target-sensitivity must lie strictly between 0 and 1")
    parent = next(
        (
            m
            for m in monitored(settings, session)
            if m.finding_code == finding_code and m.role == ACTIVE
        ),
        None,
    )
    if parent is None:
        raise registry.RegistryError(f"no model in force answers finding {finding_code}")
    meta = read_metadata(parent.path)
    cases = [
        (row, label)
        for row, label in rows.labelled_scores(session, finding_code)
        if row.model == parent.model and row.version == parent.version and row.role == ACTIVE
    ]
    labels = np.array([label for _r, label in cases], dtype=bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if min(n_pos, n_neg) < MIN_PER_CLASS:
        raise registry.RegistryError(
            f"{parent.model}@{parent.version}: {n_pos} labelled positive and {n_neg} negative "
            f"cases; at least {MIN_PER_CLASS} of each are needed"
        )
    probabilities = np.array([row.probability for row, _l in cases], dtype=np.float64)
    fittable = np.array([row.stage != "screen" for row, _l in cases], dtype=bool)
    reachable = float((labels & fittable).sum() / n_pos)
    if target_sensitivity > reachable:
        raise registry.RegistryError(
            f"target sensitivity {target_sensitivity:g} is out of reach: the screen called "
            f"absent {n_pos - int((labels & fittable).sum())} of {n_pos} positive cases "
            f"before {parent.model} saw them (at most {reachable:.3f})"
        )
    z = metrics.logit(probabilities)
    fit = _fit(z, labels, fittable, target_sensitivity)
    recalibrated = np.where(fittable, _sigmoid(z / fit.temperature), probabilities)
    calls = fittable & (recalibrated >= fit.threshold)
    figures = assess(labels, recalibrated, calls, fit.threshold)
    intervals = _bootstrap(z, labels, fittable, target_sensitivity)
    report = {
        "parent": f"{parent.model}@{parent.version}",
        "finding_code": finding_code,
        "target_sensitivity": target_sensitivity,
        "n_cases": len(cases),
        "temperature": round(fit.temperature, 4),
        "temperature_ci": intervals["temperature"],
        "threshold": round(fit.threshold, 6),
        "threshold_ci": intervals["threshold"],
        "max_reachable_sensitivity": round(reachable, 4),
        **figures,
    }
    version = _derive(session, settings, parent.path, meta, fit, report, actor=actor)
    return version, {**report, "name_version": f"{version.name}@{version.version}"}


def _fit(z: np.ndarray, labels: np.ndarray, fittable: np.ndarray, target: float) -> Fit:
    temperature = metrics.fit_temperature(z[fittable], labels[fittable])
    # Cases the screen called absent stay absent: they count as misses at any threshold.
    p = np.where(fittable, _sigmoid(z / temperature), -np.inf)
    return Fit(temperature, metrics.threshold_for_sensitivity(labels, p, target))


def _bootstrap(
    z: np.ndarray, labels: np.ndarray, fittable: np.ndarray, target: float
) -> dict[str, list[float]]:
    """95 % percentile intervals of the temperature and threshold over resampled cases."""
    rng = np.random.default_rng(0)  # reproducible output for the same cases
    temperatures, thresholds = [], []
    n = len(z)
    for _ in range(BOOTSTRAP):
        pick = rng.integers(0, n, n)
        y, f = labels[pick], fittable[pick]
        if min(int((y & f).sum()), int((~y & f).sum())) < 2 or (y & f).sum() < target * y.sum():
            continue
        fit = _fit(z[pick], y, f, target)
        temperatures.append(fit.temperature)
        thresholds.append(fit.threshold)
    if not temperatures:
        return {"temperature": [], "threshold": []}
    return {
        "temperature": [round(float(v), 4) for v in np.percentile(temperatures, [2.5, 97.5])],
        "threshold": [round(float(v), 6) for v in np.percentile(thresholds, [2.5, 97.5])],
    }


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.asarray(1.0 / (1.0 + np.exp(-z)))


def _derive(
    session: Session,
    settings: Settings,
    parent_path: Path,
    meta: dict[str, Any],
    fit: Fit,
    report: dict[str, Any],
    *,
    actor: str,
) -> ModelVersion:
    """Write the derived bundle beside nothing (a temporary folder) and install it."""
    name, parent_version = str(meta["name"]), str(meta["version"])
    base = parent_version.split("+site.")[0]
    taken = {v.version for v in rows.list_versions(session) if v.name == name}
    k = 1
    while f"{base}+site.{k}" in taken:
        k += 1
    version = f"{base}+site.{k}"
    now = datetime.now(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")
    derived = json.loads(json.dumps(meta))
    derived["version"] = version
    derived.setdefault("changelog", {})[version] = (
        f"site recalibration of {name}@{parent_version}: temperature x{fit.temperature:.4f}, "
        f"threshold for sensitivity {report['target_sensitivity']:g}"
    )
    if meta.get("role") == "segment":
        spec = derived["cardiomegaly"]
        slope = float(spec["logistic"]["slope"])
        intercept = float(spec["logistic"]["intercept"])
        spec["logistic"] = {
            "slope": slope / fit.temperature,
            "intercept": intercept / fit.temperature,
        }
        # p' >= t  <=>  (slope * ratio + intercept) / T >= logit(t)
        logit_t = float(metrics.logit(np.array([fit.threshold]))[0])
        spec["ratio_threshold"] = (logit_t * fit.temperature - intercept) / slope
    else:
        label = derived["labels"][0]["name"]
        derived["calibration"]["temperature"] = (
            float(meta["calibration"]["temperature"]) * fit.temperature
        )
        derived["thresholds"][label] = fit.threshold
    derived.setdefault("eval_metrics", {})["site"] = {
        k: report[k]
        for k in (
            "n_labelled",
            "prevalence",
            "auroc",
            "auroc_ci",
            "sensitivity",
            "sensitivity_ci",
            "specificity",
            "specificity_ci",
            "ece",
            "threshold",
        )
    }
    derived["provenance"] = {
        "parent": f"{name}@{parent_version}",
        "parent_sha256": meta["sha256"]["models/model.pt"],
        "n_cases": report["n_cases"],
        "n_positive": report["n_positive"],
        "n_negative": report["n_negative"],
        "date": now,
        "target_sensitivity": report["target_sensitivity"],
        "temperature": report["temperature"],
        "method": "temperature scaling on the reported probabilities' logits; threshold "
        "for the target sensitivity on the same labelled cases",
    }
    with tempfile.TemporaryDirectory() as folder:
        target = Path(folder) / "bundle"
        shutil.copytree(parent_path, target)
        for path in target.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        (target / "configs" / "metadata.json").write_text(json.dumps(derived, indent=2) + "\n")
        card = target / CARD
        card.write_text(card.read_text() + _card_section(derived, report))
        return registry.install(session, settings, target, actor=actor)


def _card_section(meta: dict[str, Any], report: dict[str, Any]) -> str:
    p = meta["provenance"]
    return (
        f"\n\n## Site recalibration ({meta['version']})\n\n"
        f"Derived from {p['parent']} (weights sha256 {p['parent_sha256']}) on {p['date']} "
        f"from {p['n_cases']} labelled cases of this site ({p['n_positive']} positive, "
        f"{p['n_negative']} negative), target sensitivity {p['target_sensitivity']:g}.\n"
        f"Temperature x{report['temperature']} (95 % CI {report['temperature_ci']}), "
        f"threshold {report['threshold']} (95 % CI {report['threshold_ci']}); on the same "
        f"cases: AUROC {report['auroc']} (95 % CI {report['auroc_ci']}), sensitivity "
        f"{report['sensitivity']} (95 % CI {report['sensitivity_ci']}), specificity "
        f"{report['specificity']} (95 % CI {report['specificity_ci']}), ECE {report['ece']}. "
        "These are in-sample figures: the same cases chose the threshold. Shadow the "
        "version and compare it on new cases before activating it.\n"
    )
