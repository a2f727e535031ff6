"""Recording received instances: study/series/instance rows, the job, the audit event.

Everything for one received instance happens in *one* transaction, so the database
never shows an instance without its job or a job without its instance. De-duplication
is decided here, by SOP Instance UID and SHA-256:

* same UID, same bytes  → ``duplicate``: acknowledged, nothing new stored;
* same UID, other bytes → ``new_version``: kept next to the earlier version(s);
* new UID               → ``stored``.

Concurrent senders of the same study or instance are handled with insert-or-ignore
for studies/series and the unique constraints on instances, retried a few times.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from storage.audit import record_event
from storage.db import dialect_insert, session_scope
from storage.models import Instance, Series, Study
from storage.queue import enqueue

MAX_ATTEMPTS = 3


class Disposition(enum.StrEnum):
    """What happened to a received instance."""

    STORED = "stored"
    DUPLICATE = "duplicate"
    NEW_VERSION = "new_version"


@dataclass(frozen=True)
class ReceivedInstance:
    """Everything the database keeps about one received, already spooled, instance."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    sha256: str
    size_bytes: int
    spool_path: str
    calling_ae: str
    called_ae: str
    peer_address: str
    peer_port: int | None
    received_at: datetime
    modality: str | None = None
    body_part_examined: str | None = None
    series_number: int | None = None
    instance_number: int | None = None
    view_position: str | None = None
    rows: int | None = None
    columns: int | None = None
    photometric_interpretation: str | None = None
    study_date: str | None = None
    accession_number: str | None = None


@dataclass(frozen=True)
class Recorded:
    """Outcome of :func:`record_received`."""

    disposition: Disposition
    instance_id: int
    version: int
    job_id: int | None
    previous_versions: int


def record_received(
    factory: sessionmaker[Session], received: ReceivedInstance, *, actor: str
) -> Recorded:
    """Record an instance (or its duplicate) in one transaction; retried on races."""
    for attempt in range(1, MAX_ATTEMPTS + 1):
        try:
            with session_scope(factory) as session:
                return _record_once(session, received, actor)
        except IntegrityError:
            if attempt == MAX_ATTEMPTS:
                raise
    raise AssertionError("unreachable")


def _record_once(session: Session, received: ReceivedInstance, actor: str) -> Recorded:
    versions = session.execute(
        select(Instance.id, Instance.version, Instance.sha256)
        .where(Instance.sop_instance_uid == received.sop_instance_uid)
        .order_by(Instance.version)
    ).all()
    for row in versions:
        if row.sha256 == received.sha256:
            _audit(session, "instance.duplicate", received, actor, row.id, None, row.version)
            return Recorded(Disposition.DUPLICATE, row.id, row.version, None, len(versions))
    version = versions[-1].version + 1 if versions else 1
    instance = _insert_instance(session, received, version)
    job = enqueue(session, instance.id, actor=actor)
    disposition = Disposition.NEW_VERSION if versions else Disposition.STORED
    _audit(session, f"instance.{disposition.value}", received, actor, instance.id, job.id, version)
    return Recorded(disposition, instance.id, version, job.id, len(versions))


def _insert_instance(session: Session, received: ReceivedInstance, version: int) -> Instance:
    study_id = _study_id(session, received)
    series_id = _series_id(session, received, study_id)
    instance = Instance(
        series_id=series_id,
        sop_instance_uid=received.sop_instance_uid,
        version=version,
        sop_class_uid=received.sop_class_uid,
        transfer_syntax_uid=received.transfer_syntax_uid,
        instance_number=received.instance_number,
        view_position=received.view_position,
        rows=received.rows,
        columns=received.columns,
        photometric_interpretation=received.photometric_interpretation,
        size_bytes=received.size_bytes,
        sha256=received.sha256,
        spool_path=received.spool_path,
        calling_ae=received.calling_ae,
        called_ae=received.called_ae,
        peer_address=received.peer_address,
        peer_port=received.peer_port,
        received_at=received.received_at,
    )
    session.add(instance)
    session.flush()
    return instance


def _study_id(session: Session, received: ReceivedInstance) -> int:
    study_id, created = _get_or_create(
        session,
        Study,
        "study_instance_uid",
        {
            "study_instance_uid": received.study_instance_uid,
            "study_date": received.study_date,
            "accession_number": received.accession_number,
            "first_received_at": received.received_at,
            "last_received_at": received.received_at,
        },
    )
    if not created:
        session.execute(
            update(Study).where(Study.id == study_id).values(last_received_at=received.received_at)
        )
    return study_id


def _series_id(session: Session, received: ReceivedInstance, study_id: int) -> int:
    series_id, _ = _get_or_create(
        session,
        Series,
        "series_instance_uid",
        {
            "study_id": study_id,
            "series_instance_uid": received.series_instance_uid,
            "modality": received.modality,
            "body_part_examined": received.body_part_examined,
            "series_number": received.series_number,
            "first_received_at": received.received_at,
        },
    )
    return series_id


def _get_or_create(
    session: Session, model: type[Study] | type[Series], key: str, values: dict[str, object]
) -> tuple[int, bool]:
    """Id of the row whose ``key`` matches, inserting it if needed: (id, created).

    INSERT … ON CONFLICT DO NOTHING RETURNING lets concurrent first arrivals of one study
    race without an error: the loser simply reads the winner's row.
    """
    column = getattr(model, key)
    found = session.scalar(select(model.id).where(column == values[key]))
    if found is not None:
        return found, False
    insert = dialect_insert(session)
    statement = insert(model).values(**values).on_conflict_do_nothing(index_elements=[key])
    created = session.scalar(statement.returning(model.id))
    if created is not None:
        return created, True
    found = session.scalar(select(model.id).where(column == values[key]))
    if found is None:
        raise IntegrityError(f"{model.__tablename__} row vanished", None, Exception("race"))
    return found, False


def _audit(
    session: Session,
    kind: str,
    received: ReceivedInstance,
    actor: str,
    instance_id: int,
    job_id: int | None,
    version: int,
) -> None:
    details = {
        "version": version,
        "sha256": received.sha256,
        "size_bytes": received.size_bytes,
        "sop_class_uid": received.sop_class_uid,
        "transfer_syntax_uid": received.transfer_syntax_uid,
        "spool_path": received.spool_path,
    }
    record_event(
        session,
        kind,
        actor=actor,
        instance_id=instance_id,
        job_id=job_id,
        sop_instance_uid=received.sop_instance_uid,
        calling_ae=received.calling_ae,
        peer_address=received.peer_address,
        details=details,
    )


def count_instances(session: Session) -> int:
    """All stored instance versions."""
    return session.scalar(select(func.count()).select_from(Instance)) or 0
