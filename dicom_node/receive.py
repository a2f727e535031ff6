"""Receiving one instance: check, spool, record — then, and only then, say "stored".

This is the body of the C-STORE handler, kept free of pynetdicom so it can be tested
and benchmarked on its own. Order matters, because the sender deletes or forgets its
copy once we answer Success (0x0000):

0. data set within ``[node]
   max_dataset_bytes``?                no  → 0xA700, nothing kept
1. enough free disk?                  no  → 0xA700 (sender retries later)
2. a complete, well-formed data set?  no  → 0xC210, bytes kept in ``quarantine/``
3. UIDs present, SOP Class as in
   the C-STORE request?                no  → 0xC212 / 0xA900, bytes quarantined
   (an Affected SOP Instance UID that differs from the data set's is logged; the
   instance is indexed under the data set's own UID)
3b. declared image (Rows, Columns,
   decoded bytes) within ``[node]
   max_image_*``?                      no  → 0xC214, nothing kept (header only: a small
                                             compressed stream may declare gigabytes)
4. file durable in the spool?          no  → 0xA700 if the disk is full, else 0xC213
5. rows committed (study, series,
   instance, job, audit) in one
   transaction?                        no  → 0xC211 (sender retries; the spooled file is
                                             content-addressed, so the retry reuses it)
6. → 0x0000

No inference happens here: pynetdicom calls us on the association's thread, and a
sender waiting on a model would time out. We store and enqueue; workers do the rest.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from pydicom.uid import UID
from pynetdicom.dsutils import create_file_meta, encode_file_meta
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.dataset import DatasetError, InstanceHeader, inspect_dataset
from dicom_node.logs import get_logger
from storage.models import UID_LENGTH, utcnow
from storage.records import Disposition, ReceivedInstance, record_received
from storage.spool import Spool, SpooledObject, is_out_of_space

log = get_logger(__name__)

PREAMBLE = b"\x00" * 128 + b"DICM"
FILE_META_ALLOWANCE = 4096  # generous upper bound of what part10_header() adds


class StoreStatus(enum.IntEnum):
    """C-STORE response statuses we send (PS3.4 Annex B.2.3; C2xx are ours)."""

    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700
    SOP_CLASS_MISMATCH = 0xA900
    CANNOT_UNDERSTAND = 0xC000
    UNDECODABLE_DATASET = 0xC210
    DATABASE_UNAVAILABLE = 0xC211
    INVALID_IDENTIFIERS = 0xC212
    SPOOL_WRITE_FAILED = 0xC213
    IMAGE_TOO_LARGE = 0xC214


@dataclass(frozen=True)
class ReceiveLimits:
    """What one C-STORE may be (``[node]`` max_* keys); defaults fit any real CXR."""

    max_dataset_bytes: int = 1024**3
    max_rows: int = 8192
    max_columns: int = 8192
    max_pixel_bytes: int = 1024**3

    def dataset_refusal(self, size: int) -> str | None:
        if size > self.max_dataset_bytes:
            return f"data set {size} bytes > limit {self.max_dataset_bytes}"
        return None

    def image_refusal(self, header: InstanceHeader) -> str | None:
        """Why the declared image is too large, checked before anything decodes it."""
        rows, columns = header.rows or 0, header.columns or 0
        if rows > self.max_rows or columns > self.max_columns:
            return f"image {rows}x{columns} > limit {self.max_rows}x{self.max_columns}"
        if header.pixel_bytes > self.max_pixel_bytes:
            return f"decoded pixels {header.pixel_bytes} bytes > limit {self.max_pixel_bytes}"
        return None


@dataclass(frozen=True)
class IncomingInstance:
    """A C-STORE request as received: the encoded data set and who sent it."""

    dataset: bytes  # the data set exactly as received on the wire
    transfer_syntax_uid: str
    sop_class_uid: str  # Affected SOP Class UID of the command
    sop_instance_uid: str  # Affected SOP Instance UID of the command
    calling_ae: str
    called_ae: str
    peer_address: str
    peer_port: int | None
    received_at: datetime = field(default_factory=utcnow)

    def log_fields(self) -> dict[str, object]:
        return {
            "sop_instance_uid": self.sop_instance_uid,
            "sop_class_uid": self.sop_class_uid,
            "transfer_syntax": self.transfer_syntax_uid,
            "calling_ae": self.calling_ae,
            "peer": f"{self.peer_address}:{self.peer_port}",
            "size": len(self.dataset),
        }


@dataclass(frozen=True)
class StoreOutcome:
    """Status for the C-STORE response plus a short comment for its Error Comment."""

    status: StoreStatus
    comment: str = ""
    disposition: Disposition | None = None
    instance_id: int | None = None
    sha256: str | None = None

    @property
    def ok(self) -> bool:
        return self.status is StoreStatus.SUCCESS


class StoreService:
    """Stores instances durably and enqueues them; shared by all associations."""

    def __init__(
        self,
        spool: Spool,
        sessions: sessionmaker[Session],
        *,
        min_free_bytes: int,
        actor: str = "listener",
        on_queued: Callable[[], None] | None = None,
        limits: ReceiveLimits | None = None,
    ) -> None:
        self.spool = spool
        self.sessions = sessions
        self.min_free_bytes = min_free_bytes
        self.limits = limits or ReceiveLimits()
        self.actor = actor
        # Wakes an in-process worker as soon as a job is committed: without it, a job
        # would wait for the worker's next poll, which is pure added latency.
        self.on_queued = on_queued

    def store(self, incoming: IncomingInstance) -> StoreOutcome:
        """Run the receive pipeline; never raises (an exception becomes a failure status)."""
        started = time.perf_counter()
        try:
            result = self._store(incoming)
        except Exception:
            log.exception("store failed unexpectedly", **incoming.log_fields())
            return StoreOutcome(StoreStatus.CANNOT_UNDERSTAND, "internal error")
        elapsed_ms = round((time.perf_counter() - started) * 1000, 1)
        if result.ok:
            log.info(
                f"instance {result.disposition}",
                **incoming.log_fields(),
                instance_id=result.instance_id,
                sha256=result.sha256,
                elapsed_ms=elapsed_ms,
            )
        return result

    def _store(self, incoming: IncomingInstance) -> StoreOutcome:
        too_large = self.limits.dataset_refusal(len(incoming.dataset))
        if too_large:
            return self._over_limit(incoming, StoreStatus.OUT_OF_RESOURCES, too_large)
        refusal = self._check_space(incoming)
        if refusal:
            return refusal
        try:
            header = inspect_dataset(incoming.dataset, incoming.transfer_syntax_uid)
        except DatasetError as exc:
            return self._refuse(incoming, StoreStatus.UNDECODABLE_DATASET, str(exc))
        mismatch = _identifier_problem(header, incoming)
        if mismatch:
            return self._refuse(incoming, *mismatch)
        too_large = self.limits.image_refusal(header)
        if too_large:
            return self._over_limit(incoming, StoreStatus.IMAGE_TOO_LARGE, too_large)
        if header.sop_instance_uid != incoming.sop_instance_uid:
            log.warning(
                "SOP Instance UID of the data set differs from the C-STORE request; "
                "indexed under the data set's",
                dataset_uid=header.sop_instance_uid,
                **incoming.log_fields(),
            )
        spooled = self._spool(incoming, header)
        if isinstance(spooled, StoreOutcome):
            return spooled
        return self._record(incoming, header, spooled)

    def _check_space(self, incoming: IncomingInstance) -> StoreOutcome | None:
        needed = len(incoming.dataset) + FILE_META_ALLOWANCE + self.min_free_bytes
        free = self.spool.free_bytes()
        if free >= needed:
            return None
        log.error(
            "refusing C-STORE: spool disk nearly full", free_bytes=free, **incoming.log_fields()
        )
        return StoreOutcome(StoreStatus.OUT_OF_RESOURCES, "insufficient storage")

    def _spool(
        self, incoming: IncomingInstance, header: InstanceHeader
    ) -> SpooledObject | StoreOutcome:
        try:
            return self.spool.store((part10_header(incoming, header), incoming.dataset))
        except OSError as exc:
            if is_out_of_space(exc):
                log.error("refusing C-STORE: spool disk full", **incoming.log_fields())
                return StoreOutcome(StoreStatus.OUT_OF_RESOURCES, "insufficient storage")
            log.exception("refusing C-STORE: spool write failed", **incoming.log_fields())
            return StoreOutcome(StoreStatus.SPOOL_WRITE_FAILED, "spool write failed")

    def _record(
        self, incoming: IncomingInstance, header: InstanceHeader, spooled: SpooledObject
    ) -> StoreOutcome:
        received = _received_instance(incoming, header, spooled)
        try:
            result = record_received(self.sessions, received, actor=self.actor)
        except SQLAlchemyError as exc:
            log.error(
                "refusing C-STORE: database unavailable",
                error_type=type(exc).__name__,
                error=str(getattr(exc, "orig", None) or exc)[:300],
                spool_path=spooled.relpath,
                **incoming.log_fields(),
            )
            return StoreOutcome(StoreStatus.DATABASE_UNAVAILABLE, "database unavailable")
        if result.job_id is not None and self.on_queued is not None:
            self.on_queued()
        if result.disposition is Disposition.NEW_VERSION:
            log.warning(
                "instance re-sent with different content; kept as a new version",
                version=result.version,
                sha256=spooled.sha256,
                **incoming.log_fields(),
            )
        return StoreOutcome(
            StoreStatus.SUCCESS, "", result.disposition, result.instance_id, spooled.sha256
        )

    def _over_limit(
        self, incoming: IncomingInstance, status: StoreStatus, reason: str
    ) -> StoreOutcome:
        """A well-formed object beyond a configured limit: refused, logged, not kept
        (quarantining gigabytes would fill the disk the limit is there to protect)."""
        log.error(
            "refusing C-STORE: over a configured limit",
            status=f"0x{status:04X}",
            reason=reason,
            **incoming.log_fields(),
        )
        return StoreOutcome(status, reason[:64])

    def _refuse(self, incoming: IncomingInstance, status: StoreStatus, reason: str) -> StoreOutcome:
        """Answer with a failure and keep the offending bytes for a human to look at."""
        note: Mapping[str, object] = {
            "status": f"0x{status:04X}",
            "reason": reason,
            **incoming.log_fields(),
        }
        try:
            kept = self.spool.quarantine((part10_header(incoming), incoming.dataset), note)
        except OSError as exc:
            kept = None
            log.warning("could not quarantine refused instance", error=str(exc))
        log.error(
            "refusing C-STORE: bad data set",
            status=f"0x{status:04X}",
            reason=reason,
            quarantined=str(kept) if kept else None,
            **incoming.log_fields(),
        )
        return StoreOutcome(status, reason[:64])


def _identifier_problem(
    header: InstanceHeader, incoming: IncomingInstance
) -> tuple[StoreStatus, str] | None:
    """UIDs we index must be present, fit the schema, and agree with the command."""
    uids = {
        "SOP Instance UID": header.sop_instance_uid,
        "Study Instance UID": header.study_instance_uid,
        "Series Instance UID": header.series_instance_uid,
        "SOP Class UID": header.sop_class_uid,
    }
    for name, value in uids.items():
        if not value:
            return StoreStatus.INVALID_IDENTIFIERS, f"{name} missing"
        if len(value) > UID_LENGTH:
            return StoreStatus.INVALID_IDENTIFIERS, f"{name} longer than 64 characters"
    if header.sop_class_uid != incoming.sop_class_uid:
        return StoreStatus.SOP_CLASS_MISMATCH, "SOP Class UID differs from the C-STORE request"
    return None


def part10_header(incoming: IncomingInstance, header: InstanceHeader | None = None) -> bytes:
    """Preamble, "DICM" and File Meta Information (PS3.10 §7.1) for the received data set.

    The data set itself is never re-encoded; only this header is ours. It names the data
    set's own SOP Instance UID when known, so the file is self-consistent even if the
    sender's command disagreed with its data set.
    """
    meta = create_file_meta(
        sop_class_uid=UID(incoming.sop_class_uid),
        sop_instance_uid=UID((header and header.sop_instance_uid) or incoming.sop_instance_uid),
        transfer_syntax=UID(incoming.transfer_syntax_uid),
    )
    return PREAMBLE + encode_file_meta(meta)


def _received_instance(
    incoming: IncomingInstance, header: InstanceHeader, spooled: SpooledObject
) -> ReceivedInstance:
    assert header.study_instance_uid and header.series_instance_uid  # checked before
    assert header.sop_instance_uid
    return ReceivedInstance(
        study_instance_uid=header.study_instance_uid,
        series_instance_uid=header.series_instance_uid,
        sop_instance_uid=header.sop_instance_uid,
        sop_class_uid=incoming.sop_class_uid,
        transfer_syntax_uid=incoming.transfer_syntax_uid,
        sha256=spooled.sha256,
        size_bytes=spooled.size,
        spool_path=spooled.relpath,
        calling_ae=incoming.calling_ae,
        called_ae=incoming.called_ae,
        peer_address=incoming.peer_address,
        peer_port=incoming.peer_port,
        received_at=incoming.received_at,
        modality=header.modality,
        body_part_examined=header.body_part_examined,
        series_number=header.series_number,
        instance_number=header.instance_number,
        view_position=header.view_position,
        rows=header.rows,
        columns=header.columns,
        photometric_interpretation=header.photometric_interpretation,
        study_date=header.study_date,
        accession_number=header.accession_number,
    )
