"""The model registry's rows: installed versions, what is in force, scores and labels.

Reading what is in force is one indexed query (the latest assignment per finding, role
and slot) and :func:`generation` is a ``max(id)``: workers poll it every few seconds to
notice an activation without a restart. Writes add rows and never rewrite history, so
an interrupted activation leaves the previous assignment — the previous version — in
force, and every change stays in the audit trail.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, delete, func, select
from sqlalchemy.orm import Session

from storage.audit import record_event
from storage.models import Feedback, ModelAssignment, ModelScore, ModelVersion, utcnow

ACTIVE, SHADOW = "active", "shadow"
Slot = tuple[str, str, str]  # finding, role, "active" | "shadow"


def find_version(session: Session, name: str, version: str) -> ModelVersion | None:
    return session.scalar(
        select(ModelVersion).where(ModelVersion.name == name, ModelVersion.version == version)
    )


def list_versions(session: Session) -> list[ModelVersion]:
    return list(session.scalars(select(ModelVersion).order_by(ModelVersion.id)))


def add_version(session: Session, row: ModelVersion, *, actor: str) -> ModelVersion:
    """Register an installed bundle (the caller has verified and copied it)."""
    row.installed_at = utcnow()
    row.installed_by = actor[:64]
    session.add(row)
    session.flush()
    record_event(
        session,
        "model.installed",
        actor=actor,
        details={
            "model": row.name,
            "version": row.version,
            "sha256": row.sha256,
            "finding": row.finding,
            "role": row.role,
            "parent": row.parent,
        },
    )
    return row


def assign(
    session: Session,
    finding: str,
    role: str,
    slot: str,
    version: ModelVersion | None,
    *,
    actor: str,
    reason: str | None,
) -> ModelAssignment:
    """Put ``version`` in ``slot`` (None: the configured bundle / no shadow): one row."""
    row = ModelAssignment(
        finding=finding,
        role=role,
        slot=slot,
        model_version_id=None if version is None else version.id,
        actor=actor[:64],
        reason=reason,
        assigned_at=utcnow(),
    )
    session.add(row)
    session.flush()
    record_event(
        session,
        f"model.{slot}",
        actor=actor,
        details={
            "finding": finding,
            "role": role,
            "model": None if version is None else version.name,
            "version": None if version is None else version.version,
            "reason": reason,
        },
    )
    return row


def in_force(session: Session) -> dict[Slot, ModelVersion | None]:
    """The latest assignment of every (finding, role, slot) that ever had one."""
    latest = (
        select(func.max(ModelAssignment.id).label("id"))
        .group_by(ModelAssignment.finding, ModelAssignment.role, ModelAssignment.slot)
        .subquery()
    )
    rows = session.execute(
        select(ModelAssignment, ModelVersion)
        .join(latest, latest.c.id == ModelAssignment.id)
        .outerjoin(ModelVersion, ModelVersion.id == ModelAssignment.model_version_id)
    ).all()
    return {(a.finding, a.role, a.slot): v for a, v in rows}


def history(session: Session, finding: str, slot: str = ACTIVE) -> list[ModelAssignment]:
    """Assignments of ``finding``'s ``slot`` (every role), newest first."""
    return list(
        session.scalars(
            select(ModelAssignment)
            .where(ModelAssignment.finding == finding, ModelAssignment.slot == slot)
            .order_by(ModelAssignment.id.desc())
        )
    )


def generation(session: Session) -> int:
    """Changes whenever anything is activated or shadowed (what workers poll)."""
    return int(session.scalar(select(func.coalesce(func.max(ModelAssignment.id), 0))) or 0)


def version_by_id(session: Session, version_id: int | None) -> ModelVersion | None:
    return None if version_id is None else session.get(ModelVersion, version_id)


# -- scores ---------------------------------------------------------------------------


def record_scores(session: Session, rows: Sequence[ModelScore]) -> None:
    """Insert each score, replacing an earlier one of the same image, finding, model
    version and role (a re-run of the job), in the caller's transaction."""
    for row in rows:
        session.execute(
            delete(ModelScore).where(
                ModelScore.instance_id == row.instance_id,
                ModelScore.finding_code == row.finding_code,
                ModelScore.model == row.model,
                ModelScore.version == row.version,
                ModelScore.role == row.role,
            )
        )
        row.created_at = row.created_at or utcnow()
        session.add(row)


SCORE_COLUMNS = (
    ModelScore.id,
    ModelScore.sop_instance_uid,
    ModelScore.finding_code,
    ModelScore.model,
    ModelScore.version,
    ModelScore.role,
    ModelScore.assessed,
    ModelScore.probability,
    ModelScore.present,
    ModelScore.threshold,
    ModelScore.stage,
)


def scores(
    session: Session,
    *,
    model: str | None = None,
    version: str | None = None,
    finding_code: str | None = None,
) -> list[Any]:
    """Assessed scores (optionally of one model version or finding)."""
    query = select(*SCORE_COLUMNS).where(ModelScore.assessed.is_(True))
    if model is not None:
        query = query.where(ModelScore.model == model)
    if version is not None:
        query = query.where(ModelScore.version == version)
    if finding_code is not None:
        query = query.where(ModelScore.finding_code == finding_code)
    return list(session.execute(query))


WINDOW_COLUMNS = (
    ModelScore.id,
    ModelScore.assessed,
    ModelScore.probability,
    ModelScore.refused,
    ModelScore.ood_distance,
    ModelScore.age,
    ModelScore.sex,
    ModelScore.view,
    ModelScore.manufacturer,
    ModelScore.pixel_spacing,
    ModelScore.photometric,
    ModelScore.bits,
    ModelScore.created_at,
)


def window(
    session: Session,
    model: str,
    version: str,
    role: str,
    finding_code: str,
    *,
    limit: int,
    since: datetime | None = None,
    oldest: bool = False,
) -> list[Any]:
    """Up to ``limit`` scores of one model version: the newest (or, with ``oldest``, the
    first this site recorded), read through ``ix_model_scores_window``."""
    query = select(*WINDOW_COLUMNS).where(
        ModelScore.model == model,
        ModelScore.version == version,
        ModelScore.role == role,
        ModelScore.finding_code == finding_code,
    )
    if since is not None:
        query = query.where(ModelScore.created_at >= since)
    order = ModelScore.id.asc() if oldest else ModelScore.id.desc()
    return list(session.execute(query.order_by(order).limit(limit)))


def scored_versions(session: Session) -> list[tuple[str, str, str, str]]:
    """Every (finding code, model, version, role) that has scores."""
    rows = session.execute(
        select(
            ModelScore.finding_code, ModelScore.model, ModelScore.version, ModelScore.role
        ).distinct()
    ).all()
    return [(r[0], r[1], r[2], r[3]) for r in rows]


# -- feedback -------------------------------------------------------------------------


@dataclass(frozen=True)
class Label:
    """One reader's label as received (study or instance, finding, present)."""

    finding_code: str
    present: bool
    reader: str
    source: str
    study_instance_uid: str | None = None
    sop_instance_uid: str | None = None


def add_feedback(session: Session, labels: Iterable[Label], *, actor: str) -> int:
    """Append the labels (a later one supersedes an earlier one of the same case and
    finding when labels are read) and one audit event for the batch."""
    now, count, sources = utcnow(), 0, set()
    for label in labels:
        session.add(
            Feedback(
                study_instance_uid=label.study_instance_uid,
                sop_instance_uid=label.sop_instance_uid,
                finding_code=label.finding_code,
                present=label.present,
                reader=label.reader[:64],
                source=label.source[:32],
                received_at=now,
                actor=actor[:64],
            )
        )
        count += 1
        sources.add(label.source)
    record_event(
        session,
        "feedback.received",
        actor=actor,
        details={"labels": count, "sources": sorted(sources)},
    )
    return count


def labelled_scores(session: Session, finding_code: str | None = None) -> list[tuple[Any, bool]]:
    """Assessed scores with the label in force for their case: the latest instance-level
    label, else the latest study-level one."""
    latest = (
        select(func.max(Feedback.id).label("id"))
        .group_by(Feedback.study_instance_uid, Feedback.sop_instance_uid, Feedback.finding_code)
        .subquery()
    )
    labels = select(Feedback).join(latest, latest.c.id == Feedback.id).subquery()
    base = select(*SCORE_COLUMNS, labels.c.present.label("label")).where(
        ModelScore.assessed.is_(True)
    )
    if finding_code is not None:
        base = base.where(ModelScore.finding_code == finding_code)
    by_sop = base.join(
        labels,
        and_(
            labels.c.sop_instance_uid == ModelScore.sop_instance_uid,
            labels.c.finding_code == ModelScore.finding_code,
        ),
    )
    by_study = base.join(
        labels,
        and_(
            labels.c.sop_instance_uid.is_(None),
            labels.c.study_instance_uid == ModelScore.study_instance_uid,
            labels.c.finding_code == ModelScore.finding_code,
        ),
    )
    found: dict[int, tuple[Any, bool]] = {}
    for row in session.execute(by_study):
        found[row.id] = (row, bool(row.label))
    for row in session.execute(by_sop):  # an instance's own label wins
        found[row.id] = (row, bool(row.label))
    return list(found.values())


def feedback_count(session: Session) -> int:
    return int(session.scalar(select(func.count(Feedback.id))) or 0)


def known_cases(session: Session, labels: Sequence[Label]) -> int:
    """How many of ``labels`` name an image or study some model scored here."""
    sops = {label.sop_instance_uid for label in labels if label.sop_instance_uid}
    studies = {
        label.study_instance_uid
        for label in labels
        if label.study_instance_uid and not label.sop_instance_uid
    }
    found_sops = _scored(session, ModelScore.sop_instance_uid, sops)
    found_studies = _scored(session, ModelScore.study_instance_uid, studies)
    return sum(
        1
        for label in labels
        if (label.sop_instance_uid or None) in found_sops
        or (not label.sop_instance_uid and label.study_instance_uid in found_studies)
    )


def _scored(session: Session, column: Any, uids: set[str]) -> set[str]:
    """The ``uids`` that appear in ``column`` of the scores (queried 500 at a time)."""
    found: set[str] = set()
    for chunk in _chunks(sorted(uids)):
        found |= set(session.scalars(select(column).where(column.in_(chunk)).distinct()))
    return found


def _chunks(values: Sequence[str], size: int = 500) -> Iterable[Sequence[str]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]
