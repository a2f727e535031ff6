"""Study priority: STAT, URGENT or ROUTINE, and a score, from the findings of its images.

Every finding of the study's images is rated on its own, with the thresholds and weight of
its ``[priority.findings.<name>]`` table (:class:`~dicom_node.config.FindingPriority`):

* **confirmed** — the cascade's confirm model ran and found it present
  (``stage == "confirm"`` and ``present`` in the stored finding);
* otherwise **unconfirmed**: screen-only (the screen probability stayed below the screen
  threshold, so the confirm model never ran) or rejected by the confirm model.

Level of one finding with probability ``p``:

* ``STAT`` when confirmed and ``p ≥ stat_at``;
* ``URGENT`` when ``p ≥ urgent_at`` (the most an unconfirmed finding can reach);
* ``ROUTINE`` otherwise.

Score of one finding: ``weight × p × c``, with ``c = 1`` when confirmed and
``c = unconfirmed_factor`` (``[priority]``, default 0.5) otherwise.

The study takes the highest level and the highest score over its findings; its top
finding is the one with the highest (level, score). Only the most recent scored analysis
of each image counts (a re-run replaces the earlier opinion; a changed image re-sent
under its old SOP Instance UID replaces the old version). A study none of whose images was
scored has no priority (rank 0); the worklist shows it after the prioritised ones.

The priority is recomputed in the worker's transaction each time an image of the study
gets a result (:func:`update_study_priority`), so a second image that raises the level
raises it for the whole study; the study row is locked first, so two workers finishing
images of one study cannot overwrite each other's update.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_node.config import FindingPriority, PrioritySettings
from dicom_node.logs import get_logger
from storage.audit import record_event
from storage.models import Instance, Result, ResultStatus, Series, Study, utcnow
from storage.worklist import NO_PRIORITY_RANK, PRIORITY_RANKS

log = get_logger(__name__)

STAT, URGENT, ROUTINE = "STAT", "URGENT", "ROUTINE"
RANKS: Mapping[str, int] = PRIORITY_RANKS  # studies.priority_rank, the worklist's order
NO_RANK = NO_PRIORITY_RANK
_DEFAULT_FINDING = FindingPriority()


@dataclass(frozen=True)
class StudyPriority:
    """The priority of a study, or of nothing yet (``level`` None, rank 0)."""

    level: str | None = None
    score: float | None = None
    top_finding: str | None = None
    top_probability: float | None = None

    @property
    def rank(self) -> int:
        return RANKS[self.level] if self.level else NO_RANK

    @property
    def report_value(self) -> str | None:
        """The SR's value for the priority (``"stat"`` …), None without a level."""
        return self.level.lower() if self.level else None

    def same_as(self, other: StudyPriority) -> bool:
        """Equal level and score (to 1e-6: a re-run's last float digits are not news)."""
        return self.level == other.level and _round(self.score) == _round(other.score)

    def as_dict(self) -> dict[str, Any]:
        return {
            "level": self.level,
            "score": _round(self.score),
            "top_finding": self.top_finding,
            "top_probability": _round(self.top_probability),
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)


def finding_rules(finding: Mapping[str, Any], settings: PrioritySettings) -> FindingPriority:
    """The ``[priority.findings.*]`` table for a stored finding (code first, then name)."""
    code = str(finding.get("code") or "")
    name = str(finding.get("meaning") or "").strip().casefold().replace(" ", "_")
    by_name = None
    for key, rules in settings.findings.items():
        if rules.code is not None:
            if rules.code == code:
                return rules
        elif key.casefold() == name:
            by_name = rules
    return by_name or _DEFAULT_FINDING


def is_confirmed(finding: Mapping[str, Any]) -> bool:
    """Whether the confirm model ran and found it present."""
    return finding.get("stage") == "confirm" and bool(finding.get("present"))


def rate_finding(finding: Mapping[str, Any], settings: PrioritySettings) -> tuple[str, float]:
    """``(level, score)`` of one stored finding (see the module docstring)."""
    rules = finding_rules(finding, settings)
    probability = float(finding.get("probability") or 0.0)
    confirmed = is_confirmed(finding)
    if confirmed and probability >= rules.stat_at:
        level = STAT
    elif probability >= rules.urgent_at:
        level = URGENT
    else:
        level = ROUTINE
    if RANKS[level] > RANKS[rules.highest.upper()]:
        level = rules.highest.upper()
    factor = 1.0 if confirmed else settings.unconfirmed_factor
    return level, rules.weight * probability * factor


def is_assessed(finding: Mapping[str, Any]) -> bool:
    """A stored finding that was assessed (older rows have no status: they were)."""
    return finding.get("status", "assessed") == "assessed"


def study_priority(
    findings: Iterable[Mapping[str, Any]], settings: PrioritySettings
) -> StudyPriority:
    """Highest level and score over ``findings``; no findings → no priority."""
    best: tuple[int, float, Mapping[str, Any]] | None = None
    top_score: float | None = None
    for finding in filter(is_assessed, findings):  # not assessed: never feeds the priority
        level, score = rate_finding(finding, settings)
        top_score = score if top_score is None else max(top_score, score)
        if best is None or (RANKS[level], score) > best[:2]:
            best = (RANKS[level], score, finding)
    if best is None:
        return StudyPriority()
    rank, _, finding = best
    level = next(name for name, value in RANKS.items() if value == rank)
    return StudyPriority(
        level=level,
        score=top_score,
        top_finding=str(finding.get("meaning") or finding.get("code") or "") or None,
        top_probability=float(finding.get("probability") or 0.0),
    )


def study_findings(
    session: Session, study_id: int, *, except_sop_instance_uid: str | None = None
) -> list[dict[str, Any]]:
    """The findings of the most recent scored analysis of each image of the study.

    ``except_sop_instance_uid`` leaves one image out (the one being analysed, whose new
    findings the caller adds itself).
    """
    query = (
        select(Instance.sop_instance_uid, Result.findings)
        .join(Result, Result.instance_id == Instance.id)
        .join(Series, Series.id == Instance.series_id)
        .where(Series.study_id == study_id, Result.status == ResultStatus.SCORED)
        .order_by(Instance.version, Result.updated_at, Result.id)
    )
    if except_sop_instance_uid is not None:
        query = query.where(Instance.sop_instance_uid != except_sop_instance_uid)
    latest: dict[str, list[dict[str, Any]]] = {}
    for sop_instance_uid, findings in session.execute(query):
        latest[sop_instance_uid] = list(findings or [])
    return [finding for findings in latest.values() for finding in findings]


def locked_study(session: Session, study_id: int) -> Study:
    """The study, locked: serialises workers finishing its images."""
    study = session.get(Study, study_id, with_for_update=True)
    if study is None:
        raise LookupError(f"study {study_id} does not exist")
    return study


def update_study_priority(
    session: Session,
    study: Study,
    findings: Iterable[Mapping[str, Any]],
    settings: PrioritySettings,
    *,
    actor: str,
    job_id: int | None = None,
) -> StudyPriority:
    """Recompute and store the study's priority in the caller's transaction.

    ``study`` is locked by the caller (:func:`locked_study`) and ``findings`` are its
    :func:`study_findings`, read after the result was recorded (flushed). A changed level
    or score is written, audited (``study.priority``, old → new) and logged; an unchanged
    one is left alone.
    """
    new = study_priority(findings, settings)
    old = StudyPriority(study.priority, study.priority_score)
    if new.same_as(old):
        return new
    _store(study, new)
    details = {
        "study_id": study.id,
        "old": old.level,
        "new": new.level,
        "old_score": _round(old.score),
        "new_score": _round(new.score),
        "top_finding": new.top_finding,
        "top_probability": _round(new.top_probability),
    }
    record_event(session, "study.priority", actor=actor, job_id=job_id, details=details)
    log.info(
        "study priority changed",
        study_instance_uid=study.study_instance_uid,
        job_id=job_id,
        **{key: value for key, value in details.items() if key != "study_id"},
    )
    return new


def _store(study: Study, priority: StudyPriority) -> None:
    study.priority = priority.level
    study.priority_rank = priority.rank
    study.priority_score = priority.score
    study.top_finding = priority.top_finding
    study.top_probability = priority.top_probability
    study.priority_updated_at = utcnow()
