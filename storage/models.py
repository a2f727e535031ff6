"""SQLAlchemy 2 models: what the node has received and what it still has to do with it.

The schema mirrors the DICOM information model only as far as the node needs it
(study → series → instance), plus the work queue (``jobs``), what the engine concluded
(``results``), the outbox of objects still to deliver (``sends``), an append-only audit
trail (``audit_events``) and the liveness record of running listeners (``node_heartbeats``).

Patient demographics are deliberately *not* copied into the database: the spooled file
is the source of truth for them, which keeps the database (and anything that dumps it)
free of the most sensitive identifiers.

Any change here needs an Alembic revision in ``storage/migrations/versions``.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

# Deterministic constraint names, so that migrations can refer to them on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

UID_LENGTH = 64  # PS3.5 §9.1: a UID is at most 64 characters.
AE_LENGTH = 16  # PS3.5 Table 6.2-1: AE titles are at most 16 characters.


def utcnow() -> datetime:
    """Return the current time, timezone-aware in UTC (the only time the database sees)."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that is always timezone-aware UTC in Python, on every backend.

    Why: SQLite has no timestamp type and hands back naive datetimes while PostgreSQL
    hands back aware ones; code comparing the two would break on one backend only.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTCDateTime column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


# SQLite only auto-increments an INTEGER PRIMARY KEY, so 64-bit keys become INTEGER there.
BigId = BigInteger().with_variant(Integer(), "sqlite")
JsonDocument = JSON().with_variant(JSONB(), "postgresql")


class JobState(enum.StrEnum):
    """Life cycle of a job; the allowed transitions live in :mod:`storage.queue`."""

    RECEIVED = "received"
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"


class ResultStatus(enum.StrEnum):
    """What the engine made of an image (mirrors the engine's own result status)."""

    SCORED = "scored"
    NOT_SCORED = "not_scored"
    ERROR = "error"


class SendState(enum.StrEnum):
    """Life cycle of one outbox entry; the transitions live in :mod:`storage.outbox`."""

    PENDING = "pending"
    SENDING = "sending"
    SENT = "sent"
    DEAD = "dead"


def _state_enum(enum_class: type[enum.StrEnum], name: str) -> Enum:
    """A string column with a CHECK constraint: portable, readable in plain SQL."""
    return Enum(
        enum_class,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=16,
        values_callable=lambda states: [s.value for s in states],
        validate_strings=True,
    )


class Base(DeclarativeBase):
    """Declarative base carrying the naming convention."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Study(Base):
    """A study as seen by the node (first and latest arrival of any of its instances)."""

    __tablename__ = "studies"
    __table_args__ = (Index("ix_studies_worklist", "priority_rank", "first_received_at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH), unique=True)
    study_date: Mapped[str | None] = mapped_column(String(8))
    accession_number: Mapped[str | None] = mapped_column(String(16))
    first_received_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # Study-level priority from the findings of its instances (None until one is scored).
    # ``priority_rank`` orders the worklist: higher is more urgent, 0 = not prioritised.
    priority: Mapped[str | None] = mapped_column(String(8))
    priority_rank: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    priority_score: Mapped[float | None] = mapped_column(Float)
    top_finding: Mapped[str | None] = mapped_column(String(64))
    top_probability: Mapped[float | None] = mapped_column(Float)
    priority_updated_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    """A series; modality and body part live here as in the General Series module."""

    __tablename__ = "series"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH), unique=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    body_part_examined: Mapped[str | None] = mapped_column(String(64))
    series_number: Mapped[int | None] = mapped_column(Integer)
    first_received_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    """One received SOP instance *version*, exactly as it lies in the spool.

    A re-sent instance with identical bytes is not stored again; one with the same SOP
    Instance UID but different bytes becomes a new row with ``version`` + 1, so nothing
    a modality sent is ever silently overwritten.
    """

    __tablename__ = "instances"
    __table_args__ = (
        UniqueConstraint("sop_instance_uid", "version"),
        UniqueConstraint("sop_instance_uid", "sha256"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    version: Mapped[int] = mapped_column(Integer, default=1)
    sop_class_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    instance_number: Mapped[int | None] = mapped_column(Integer)
    view_position: Mapped[str | None] = mapped_column(String(16))
    rows: Mapped[int | None] = mapped_column(Integer)
    columns: Mapped[int | None] = mapped_column(Integer)
    photometric_interpretation: Mapped[str | None] = mapped_column(String(16))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    spool_path: Mapped[str] = mapped_column(String(255))
    calling_ae: Mapped[str] = mapped_column(String(AE_LENGTH))
    called_ae: Mapped[str] = mapped_column(String(AE_LENGTH))
    peer_address: Mapped[str] = mapped_column(String(64))
    peer_port: Mapped[int | None] = mapped_column(Integer)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    # Set when retention removed the spooled file; the row stays as history.
    purged_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    series: Mapped[Series] = relationship(back_populates="instances")
    jobs: Mapped[list[Job]] = relationship(back_populates="instance")


class Job(Base):
    """A unit of work on one instance version (e.g. ``analyze``), driven by the queue."""

    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_claim", "state", "available_at", "priority"),
        Index("ix_jobs_finished", "state", "finished_at"),
        Index("ix_jobs_state", "state"),  # status: counts per state, index-only
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"), index=True)
    kind: Mapped[str] = mapped_column(String(32), default="analyze")
    state: Mapped[JobState] = mapped_column(
        Enum(
            JobState,
            name="job_state",
            native_enum=False,
            create_constraint=True,
            length=16,
            values_callable=lambda states: [s.value for s in states],
            validate_strings=True,
        ),
        default=JobState.RECEIVED,
    )
    priority: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    last_error: Mapped[str | None] = mapped_column(Text)
    worker: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    available_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    queued_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    instance: Mapped[Instance] = relationship(back_populates="jobs")


class Result(Base):
    """What one pipeline (with one set of models) concluded about one instance version.

    Unique per (instance, pipeline, model identity): re-running a job — after a crash, say —
    updates its row instead of adding a second opinion of the same models. The findings
    are kept as JSON (code, scheme, meaning, probability, present, stage, threshold,
    model) because their shape follows the models, not the schema.
    """

    __tablename__ = "results"
    __table_args__ = (
        UniqueConstraint("instance_id", "pipeline", "model_key"),
        Index("ix_results_status", "status"),  # status: counts per status, index-only
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"), index=True)
    job_id: Mapped[int | None] = mapped_column(BigInteger)
    pipeline: Mapped[str] = mapped_column(String(32))
    model_key: Mapped[str] = mapped_column(String(255))
    status: Mapped[ResultStatus] = mapped_column(_state_enum(ResultStatus, "result_status"))
    reason: Mapped[str | None] = mapped_column(Text)
    findings: Mapped[list[dict[str, Any]]] = mapped_column(JsonDocument, default=list)
    in_domain: Mapped[bool | None] = mapped_column(Boolean)
    ood_distance: Mapped[float | None] = mapped_column(Float)
    warnings: Mapped[list[str]] = mapped_column(JsonDocument, default=list)
    timings_ms: Mapped[dict[str, float]] = mapped_column(JsonDocument, default=dict)
    # Anatomy measurements: one {"name", "code", "scheme", "meaning", "value", "unit"} each.
    measurements: Mapped[list[dict[str, Any]] | None] = mapped_column(
        JsonDocument,
        default=list,
        nullable=True,  # see migration 0007
    )
    # One {"kind", "sop_class_uid", "sop_instance_uid", "path"} per output object written.
    outputs: Mapped[list[dict[str, str]]] = mapped_column(
        JsonDocument,
        default=list,
        nullable=True,  # see migration 0006; always a list
    )
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    purged_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    def output(self, kind: str) -> dict[str, str] | None:
        """The output object of type ``kind`` (``"sr"``, ``"sc"`` …), if one was written."""
        return next((item for item in self.outputs or [] if item.get("kind") == kind), None)

    @property
    def sr_sop_instance_uid(self) -> str | None:
        return _field(self.output("sr"), "sop_instance_uid")

    @property
    def sr_path(self) -> str | None:
        return _field(self.output("sr"), "path")

    @property
    def sc_sop_instance_uid(self) -> str | None:
        return _field(self.output("sc"), "sop_instance_uid")

    @property
    def sc_path(self) -> str | None:
        return _field(self.output("sc"), "path")


def _field(output: dict[str, str] | None, key: str) -> str | None:
    return None if output is None else output.get(key)


class Send(Base):
    """One object to deliver to one destination: the persistent outbox.

    Unique per (destination, SOP Instance UID): whatever happens upstream — a job re-run,
    a worker that crashed after committing — one object is queued for one destination
    once. ``next_attempt_at`` is when a pending send is due, and for a send being
    transmitted the end of its lease (a sender that died leaves it to be claimed again).
    """

    __tablename__ = "sends"
    __table_args__ = (
        UniqueConstraint("destination", "sop_instance_uid"),
        Index("ix_sends_claim", "state", "next_attempt_at"),
        Index("ix_sends_destination_state", "destination", "state"),  # status, index-only
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    result_id: Mapped[int | None] = mapped_column(ForeignKey("results.id"), index=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(8))
    sop_class_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    sop_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    study_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH))
    file_path: Mapped[str] = mapped_column(String(255))
    state: Mapped[SendState] = mapped_column(
        _state_enum(SendState, "send_state"), default=SendState.PENDING
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    first_enqueued_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_error: Mapped[str | None] = mapped_column(Text)
    sender: Mapped[str | None] = mapped_column(String(128))
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class AuditEvent(Base):
    """Append-only record of what happened (stored, duplicate, rejected, job moves…).

    Rows reference instances and jobs by plain id, not by foreign key, so that a later
    retention policy can delete data without having to rewrite history. Updates and
    deletes are refused by database triggers (see the initial migration).
    """

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    occurred_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    kind: Mapped[str] = mapped_column(String(64), index=True)
    actor: Mapped[str] = mapped_column(String(64))
    instance_id: Mapped[int | None] = mapped_column(BigInteger, index=True)
    job_id: Mapped[int | None] = mapped_column(BigInteger, index=True)
    sop_instance_uid: Mapped[str | None] = mapped_column(String(UID_LENGTH))
    calling_ae: Mapped[str | None] = mapped_column(String(AE_LENGTH))
    peer_address: Mapped[str | None] = mapped_column(String(64))
    details: Mapped[dict[str, Any] | None] = mapped_column(JsonDocument)


class NodeHeartbeat(Base):
    """Liveness of a listener or worker process, so ``status`` can answer from any host."""

    __tablename__ = "node_heartbeats"

    node_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(128))
    pid: Mapped[int] = mapped_column(Integer)
    ae_title: Mapped[str] = mapped_column(String(AE_LENGTH))
    host: Mapped[str] = mapped_column(String(64))
    port: Mapped[int] = mapped_column(Integer)
    version: Mapped[str] = mapped_column(String(32))
    role: Mapped[str] = mapped_column(String(16), server_default="listener")  # or "worker"
    started_at: Mapped[datetime] = mapped_column(UTCDateTime())
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime())
    stopped_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class ModelVersion(Base):
    """One installed model bundle version: what the registry can put in force.

    The bundle itself lies read-only under ``<home>/models/<name>/<version>``; the row
    keeps what the node needs without reading it (finding, role, weights digest, the
    card's validated figures) and, for a site-derived version, its parent.
    """

    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("name", "version"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    version: Mapped[str] = mapped_column(String(64))
    finding: Mapped[str] = mapped_column(String(64))
    finding_code: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(16))  # "screen" | "confirm" | "segment"
    sha256: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(512))
    parent: Mapped[str | None] = mapped_column(String(200))
    card: Mapped[dict[str, Any]] = mapped_column(JsonDocument, default=dict)
    installed_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    installed_by: Mapped[str] = mapped_column(String(64))


class ModelAssignment(Base):
    """An append-only history of what is in force: the latest row of a (finding, role,
    slot) wins. ``slot`` is "active" or "shadow"; no version means "back to the
    configured bundle" (active) or "no shadow run" (shadow).

    One INSERT is the whole activation, so it is atomic on every backend, and the
    history is the rollback's memory and the audit of who put what in force, and why.
    """

    __tablename__ = "model_assignments"
    __table_args__ = (Index("ix_model_assignments_slot", "finding", "role", "slot", "id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    finding: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(16))
    slot: Mapped[str] = mapped_column(String(8))
    model_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    actor: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str | None] = mapped_column(Text)
    assigned_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class ModelScore(Base):
    """One model version's answer for one finding on one image, flat for monitoring.

    ``role`` is "active" (the answer that was reported) or "shadow" (a candidate's,
    stored and never sent). The input descriptors are copied from the header (no
    demographics beyond age and sex) so drift needs no join and no file access.
    """

    __tablename__ = "model_scores"
    __table_args__ = (
        UniqueConstraint("instance_id", "finding_code", "model", "version", "role"),
        Index("ix_model_scores_window", "model", "version", "role", "finding_code", "id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"))
    sop_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH), index=True)
    study_instance_uid: Mapped[str] = mapped_column(String(UID_LENGTH), index=True)
    finding_code: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(128))
    version: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(8))
    assessed: Mapped[bool] = mapped_column(Boolean)
    probability: Mapped[float | None] = mapped_column(Float)
    present: Mapped[bool | None] = mapped_column(Boolean)
    threshold: Mapped[float | None] = mapped_column(Float)
    stage: Mapped[str | None] = mapped_column(String(16))
    refused: Mapped[bool] = mapped_column(Boolean)
    ood_distance: Mapped[float | None] = mapped_column(Float)
    age: Mapped[float | None] = mapped_column(Float)
    sex: Mapped[str | None] = mapped_column(String(16))
    view: Mapped[str | None] = mapped_column(String(16))
    manufacturer: Mapped[str | None] = mapped_column(String(64))
    pixel_spacing: Mapped[float | None] = mapped_column(Float)
    photometric: Mapped[str | None] = mapped_column(String(16))
    bits: Mapped[str | None] = mapped_column(String(8))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Feedback(Base):
    """A reader's label for one finding on a study or an instance: the ground truth.

    Rows are never updated: the latest row for the same case and finding supersedes the
    earlier ones, which stay as the trail.
    """

    __tablename__ = "feedback"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    study_instance_uid: Mapped[str | None] = mapped_column(String(UID_LENGTH), index=True)
    sop_instance_uid: Mapped[str | None] = mapped_column(String(UID_LENGTH), index=True)
    finding_code: Mapped[str] = mapped_column(String(64))
    present: Mapped[bool] = mapped_column(Boolean)
    reader: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(32))
    received_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    actor: Mapped[str] = mapped_column(String(64))
