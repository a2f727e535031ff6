"""The worker's analyzer, following the registry: activations apply without a restart.

Between two batches the worker calls :meth:`FollowingAnalyzer.refresh`; at most every
``CHECK_INTERVAL_S`` it reads the registry's generation (one ``max(id)``). When it
changed, the new plan's bundles are loaded and verified *beside* the running ones and
swapped in only once complete: a batch — and so every result — is made by one set of
versions, and a version that fails to load leaves the previous one in force (retried at
the next change, or after ``RETRY_S``).

Shadow runs are separate cascades in which the candidate replaces its slot, heatmaps
off; :meth:`shadow` runs them on a batch the active models have already answered.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.analyzer import CascadeAnalyzer, load_analyzer
from dicom_node.config import Settings
from dicom_node.logs import get_logger
from dicom_node.models import registry
from dicom_node.models.registry import Plan, ShadowRun
from inference.cascade import ImageResult
from storage.db import session_scope
from storage.registry import generation

log = get_logger(__name__)
CHECK_INTERVAL_S = 2.0
RETRY_S = 60.0


@dataclass
class Shadow:
    """A loaded shadow run: the candidate, and the cascade it runs in."""

    run: ShadowRun
    analyzer: CascadeAnalyzer

    @property
    def only(self) -> tuple[str, str, str]:
        version = self.run.version
        return version.finding_code, version.name, version.version


def cascade_settings(settings: Settings, plan: Plan, shadow: ShadowRun | None = None) -> Any:
    """``[inference]`` with the plan's bundles in force (and one candidate swapped in).

    A threshold override of ``[inference]`` belongs to the configured bundle it was set
    for: a registry version in that slot keeps its own validated (or site-fitted) one.
    """
    paths = plan.paths
    if shadow is not None:
        version = shadow.version
        paths.setdefault(version.finding, {})[version.role] = Path(version.path)
    inference = settings.inference
    first = next((f for f in inference.findings if f != registry.MEASURED), None)
    updates: dict[str, Any] = {}
    chosen = paths.get(first or "", {})
    if "screen" in chosen:
        updates["screen_threshold"] = None
    if "confirm" in chosen:
        updates["confirm_threshold"] = None
    segment = paths.get(registry.MEASURED, {}).get("segment")
    if segment is not None:
        updates["segment_bundle"] = segment
    if shadow is not None:
        updates["heatmaps"] = False
    return inference.model_copy(update=updates), paths, segment is not None


def load_plan(settings: Settings, plan: Plan, shadow: ShadowRun | None = None) -> CascadeAnalyzer:
    """Load and verify the bundles of ``plan`` (raises on a missing or corrupt one)."""
    inference, paths, own_ratio = cascade_settings(settings, plan, shadow)
    return load_analyzer(inference, bundle_paths=paths, bundle_ratio=own_ratio)


class FollowingAnalyzer:
    """An :class:`~dicom_node.analyzer.Analyzer` whose models follow the registry."""

    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        loader: Callable[[Settings, Plan, ShadowRun | None], CascadeAnalyzer] = load_plan,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.loader = loader
        plan = self._read_plan()
        self.active, self.shadows = self._load(plan)
        self.generation = plan.generation
        self._checked = time.monotonic()
        self._failed: tuple[int, float] | None = None  # generation that failed, when

    @property
    def identity(self) -> str:
        return self.active.identity

    @property
    def decision(self) -> dict[str, tuple[str, str]]:
        return self.active.decision

    def analyze(self, datasets: Sequence[Dataset]) -> list[ImageResult]:
        return self.active.analyze(datasets)

    def shadow(self, datasets: Sequence[Dataset]) -> list[tuple[Shadow, list[ImageResult]]]:
        return [(s, s.analyzer.analyze(datasets)) for s in self.shadows]

    def _read_plan(self) -> Plan:
        with session_scope(self.sessions) as session:
            return registry.plan(self.settings, session)

    def _load(self, plan: Plan) -> tuple[CascadeAnalyzer, list[Shadow]]:
        active = self.loader(self.settings, plan, None)
        shadows = [Shadow(run, self.loader(self.settings, plan, run)) for run in plan.shadows]
        return active, shadows

    def refresh(
        self, prepare: Callable[[CascadeAnalyzer], None] | None = None, *, force: bool = False
    ) -> bool:
        """Swap in the registry's new plan if it changed; True when it did. ``force``
        looks now rather than at most every ``CHECK_INTERVAL_S``."""
        now = time.monotonic()
        if not force and now - self._checked < CHECK_INTERVAL_S:
            return False
        self._checked = now
        with session_scope(self.sessions) as session:
            current = generation(session)
        if current == self.generation:
            return False
        if (
            self._failed is not None
            and self._failed[0] == current
            and now - self._failed[1] < RETRY_S
        ):
            return False
        try:
            plan = self._read_plan()
            active, shadows = self._load(plan)
            if prepare is not None:
                prepare(active)
        except Exception as exc:  # keep the versions in force; say why loudly
            self._failed = (current, now)
            log.error(
                "new models cannot be loaded; the previous ones stay in force",
                error_type=type(exc).__name__,
                error=str(exc)[:300],
                retry_in_s=RETRY_S,
            )
            return False
        previous = self.active.identity
        self.active, self.shadows, self.generation = active, shadows, plan.generation
        self._failed = None
        log.info(
            "models switched",
            previous=previous,
            models=active.identity,
            shadows=[s.run.version.name + "@" + s.run.version.version for s in shadows],
        )
        return True
