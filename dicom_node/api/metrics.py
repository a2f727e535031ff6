"""Prometheus metrics, computed from the database when Prometheus scrapes.

Why from the database and not from counters in this process: workers may run in other
processes or on other machines (scale-out on PostgreSQL), and what an operator wants to
alert on — jobs waiting, sends dead-lettered, how long stages take — is the node's, not
one process's. Any node's ``/metrics`` therefore reports the same figures, and a
restart loses nothing.

* ``cxr_node_instances_received_total`` — instances received (versions, never deleted);
* ``cxr_node_jobs{state}`` — jobs by state (the autoscaler watches ``state="queued"``);
* ``cxr_node_results{status}`` — results by status (scored, not_scored, error);
* ``cxr_node_sends{destination,state}`` — the outbox by destination and state;
* ``cxr_node_model_info{role,name,version,sha256}`` — the configured bundles;
* ``cxr_node_stage_duration_seconds{stage}`` — histogram of the per-stage timings every
  result keeps (``results.timings_ms``: preprocess, screen, segment, confirm, gradcam, and job =
  the whole job in its worker). Built at scrape time with one aggregate statement over
  all results, so it is cumulative like any Prometheus histogram and ``rate()`` works;
  a re-run job replaces its result's timings, which is rare enough not to matter;
* ``cxr_node_model_drift_psi`` and ``cxr_node_model_drift_level{model,version,role,
  finding_code,signal}`` — drift of each version in force against its reference
  (level 0 ok, 1 warn, 2 alert; :mod:`dicom_node.models.drift`);
* ``cxr_node_model_live_auroc`` and ``cxr_node_model_below_card{model,version,role,
  finding_code}`` — live performance against readers' feedback, and 1 when it is
  significantly below the model card;
* ``cxr_node_database_up`` — 0 when the database did not answer (then nothing else).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy import ColumnElement, case, func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import Settings
from dicom_node.logs import get_logger
from dicom_node.model_bundles import configured_bundles
from dicom_node.models.drift import LEVELS
from dicom_node.models.monitor import ModelHealth, model_health
from inference.manifest import WEIGHTS, BundleError, read_metadata
from storage.db import session_scope
from storage.models import Result
from storage.outbox import counts_by_destination
from storage.queue import counts_by_state
from storage.records import count_instances
from storage.results import counts_by_status

log = get_logger(__name__)

PREFIX = "cxr_node"
STAGES = ("preprocess", "screen", "confirm", "gradcam", "job")
BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


@dataclass(frozen=True)
class ModelInfo:
    role: str
    name: str
    version: str
    sha256: str


def configured_models(settings: Settings) -> list[ModelInfo]:
    """Name, version and weights digest of the configured bundles (from their manifests).

    Read once at start-up without loading any network (no torch): the workers verify the
    digest against the weights whenever they load a bundle, so the manifest is what runs.
    """
    models = []
    for bundle in configured_bundles(settings):
        try:
            meta = read_metadata(bundle.path)
            digest = str(meta.get("sha256", {}).get(WEIGHTS, ""))
            models.append(ModelInfo(bundle.role, str(meta["name"]), str(meta["version"]), digest))
        except (BundleError, OSError, KeyError) as exc:
            log.warning(
                "model manifest unreadable", role=bundle.role, path=str(bundle.path), error=str(exc)
            )
    return models


class NodeCollector(Collector):
    """Reads the figures above from the database at every scrape."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        models: Sequence[ModelInfo],
        settings: Settings | None = None,
    ) -> None:
        self.sessions = sessions
        self.models = tuple(models)
        self.settings = settings

    def collect(self) -> Iterator[Metric]:
        yield self._model_info()
        try:
            with session_scope(self.sessions) as session:
                families = list(_database_families(session))
                if self.settings is not None:
                    families += _model_health_families(model_health(self.settings, session))
        except SQLAlchemyError as exc:
            log.warning("metrics: database unavailable", error=str(exc).splitlines()[0][:200])
            yield _gauge("database_up", "Whether the database answered the scrape.", 0)
            return
        yield _gauge("database_up", "Whether the database answered the scrape.", 1)
        yield from families

    def _model_info(self) -> Metric:
        info = InfoMetricFamily(f"{PREFIX}_model", "Configured model bundles.", labels=["role"])
        for model in self.models:
            info.add_metric(
                [model.role], {"name": model.name, "version": model.version, "sha256": model.sha256}
            )
        return info


def _database_families(session: Session) -> Iterator[Metric]:
    yield CounterMetricFamily(
        f"{PREFIX}_instances_received",
        "Instances received (each stored version once).",
        value=count_instances(session),
    )
    jobs = GaugeMetricFamily(f"{PREFIX}_jobs", "Jobs by state.", labels=["state"])
    for state, count in counts_by_state(session).items():
        jobs.add_metric([state], count)
    yield jobs
    results = GaugeMetricFamily(f"{PREFIX}_results", "Results by status.", labels=["status"])
    for status, count in counts_by_status(session).items():
        results.add_metric([status], count)
    yield results
    sends = GaugeMetricFamily(
        f"{PREFIX}_sends",
        "Outbox entries by destination and state.",
        labels=["destination", "state"],
    )
    for destination, states in sorted(counts_by_destination(session).items()):
        for state, count in states.items():
            sends.add_metric([destination, state], count)
    yield sends
    yield _stage_histogram(session)


def _stage_histogram(session: Session) -> Metric:
    """Cumulative bucket counts of every stage's timings, in one statement."""
    columns: list[ColumnElement[Any]] = []
    for stage in STAGES:
        value_ms = Result.timings_ms[stage].as_float()
        columns += [func.count(case((value_ms <= le * 1000, 1))) for le in BUCKETS_S]
        columns += [func.count(value_ms), func.coalesce(func.sum(value_ms), 0.0)]
    row = session.execute(select(*columns)).one()
    histogram = HistogramMetricFamily(
        f"{PREFIX}_stage_duration_seconds",
        "Time per pipeline stage of each result (job = the whole job in its worker).",
        labels=["stage"],
    )
    width = len(BUCKETS_S) + 2
    for index, stage in enumerate(STAGES):
        *counts, total, sum_ms = row[index * width : (index + 1) * width]
        buckets = [(repr(le), count) for le, count in zip(BUCKETS_S, counts, strict=True)]
        histogram.add_metric([stage], [*buckets, ("+Inf", total)], float(sum_ms) / 1000)
    return histogram


def _model_health_families(health: ModelHealth) -> Iterator[Metric]:
    """Drift per version and signal; live AUROC and the below-card flag per version."""
    labels = ["model", "version", "role", "finding_code", "signal"]
    psi = GaugeMetricFamily(
        f"{PREFIX}_model_drift_psi",
        "Population stability index against the reference.",
        labels=labels,
    )
    level = GaugeMetricFamily(
        f"{PREFIX}_model_drift_level", "Drift level: 0 ok, 1 warn, 2 alert.", labels=labels
    )
    for entry in health.drift:
        values = [entry[k] for k in labels]
        psi.add_metric(values, entry["psi"])
        level.add_metric(values, LEVELS.index(entry["level"]))
    yield psi
    yield level
    labels = ["model", "version", "role", "finding_code"]
    auroc = GaugeMetricFamily(
        f"{PREFIX}_model_live_auroc", "AUROC against readers' feedback.", labels=labels
    )
    below = GaugeMetricFamily(
        f"{PREFIX}_model_below_card",
        "1 when the live figures are significantly below the model card's.",
        labels=labels,
    )
    for entry in health.performance:
        values = [entry[k] for k in labels]
        if entry["auroc"] is not None:
            auroc.add_metric(values, entry["auroc"])
        below.add_metric(values, 1.0 if entry["below_card"] else 0.0)
    yield auroc
    yield below


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{PREFIX}_{name}", documentation, value=value)


def make_registry(
    sessions: sessionmaker[Session],
    models: Sequence[ModelInfo],
    settings: Settings | None = None,
) -> CollectorRegistry:
    """A registry of its own (not the global one: several apps may live in one process);
    with ``settings``, the models' drift and live performance too."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(sessions, models, settings))
    return registry
