"""One batch of claimed jobs: read → route → infer → write results → commit.

For each claimed job the spooled file is read and routed (:mod:`dicom_node.rules`, with
the calling and called AE titles the image arrived with). Jobs routed to the cascade are
analysed together — one ``analyze`` call, so a burst shares its forward passes — and each
outcome is then committed on its own, in **one** transaction: the ``results`` row, one
outbox entry per destination and output, and the job's final state. There is no moment at
which a job is ``done`` without its sends queued, or sends exist for a job that is not.

Outcomes:

============================  =========  =============================================
what happened                 job        results / outputs
============================  =========  =============================================
scored                        done       row; SR (+ SC with a heatmap); sends queued
not scored (gate said why)    skipped    row with the reason; no SR, no SC
engine error (cannot decode)  failed     row with the reason; not retried (pointless)
routed to pipeline "none"     skipped    nothing; the job says which rule / why
file unreadable or missing    failed     nothing
unexpected exception          queued     retried later, ``failed`` after max attempts
============================  =========  =============================================

A job is only finished by the worker that still holds it: if its lease expired and
another worker took it over, the late result is dropped (the other worker's run writes
the same output UIDs, so nothing is lost).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import pydicom
from pydicom.dataset import Dataset
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import PrioritySettings
from dicom_node.engine import Engine
from dicom_node.logs import get_logger
from dicom_node.notify import StudyNotifier
from dicom_node.outputs import Output, build_outputs, write_outputs
from dicom_node.priority import (
    StudyPriority,
    locked_study,
    study_findings,
    study_priority,
    update_study_priority,
)
from dicom_node.results import Equipment
from dicom_node.rules import PIPELINE_NONE, RouteDecision, RuleSet, evaluate
from dicom_node.wakeup import Wakeup
from inference.cascade import ERROR, NOT_SCORED, SCORED, ImageResult
from storage.db import session_scope
from storage.models import Job, JobState, ResultStatus
from storage.outbox import OutgoingObject, enqueue_send
from storage.queue import fail, transition
from storage.results import ResultRecord, record_result
from storage.spool import Spool

log = get_logger(__name__)
RETRY_DELAY = timedelta(seconds=30)


@dataclass(frozen=True)
class ClaimedJob:
    """A claimed job with what the worker needs of its instance (read at claim time)."""

    job_id: int
    instance_id: int
    study_id: int
    sop_instance_uid: str
    version: int
    sha256: str
    spool_path: str
    calling_ae: str
    called_ae: str
    created_at: datetime


@dataclass
class _Work:
    """A job on its way through the batch."""

    job: ClaimedJob
    dataset: Dataset
    decision: RouteDecision
    started: float = field(default_factory=time.perf_counter)


@dataclass(frozen=True)
class _Outcome:
    """What to commit for one job."""

    state: JobState
    reason: str | None
    record: ResultRecord | None = None
    outputs: Sequence[Output] = ()
    destinations: Sequence[str] = ()


@dataclass(frozen=True)
class PipelineContext:
    """What a pipeline needs from the node (one per worker thread, with its own engine)."""

    sessions: sessionmaker[Session]
    spool: Spool
    rules: RuleSet
    equipment: Equipment
    sends_wakeup: Wakeup | None = None
    notifier: StudyNotifier | None = None  # HL7 destinations: a message per finished study
    priority: PrioritySettings = field(default_factory=PrioritySettings)


class Pipeline:
    """Runs batches of claimed jobs for one worker with one engine."""

    def __init__(self, context: PipelineContext, engine: Engine, worker_id: str) -> None:
        self.context = context
        self.engine = engine
        self.worker_id = worker_id

    def run(self, jobs: Sequence[ClaimedJob]) -> None:
        """Process every job; never raises (failures end up on the jobs)."""
        works = [work for work in (self._prepare(job) for job in jobs) if work is not None]
        if not works:
            return
        results = self._infer(works)
        if results is None:
            return
        for work, result in zip(works, results, strict=True):
            self._complete(work, result)

    # -- steps ---------------------------------------------------------------------------

    def _prepare(self, job: ClaimedJob) -> _Work | None:
        """Read and route; jobs that go no further are finished here."""
        try:
            dataset = pydicom.dcmread(self.context.spool.path_of(job.spool_path))
        except FileNotFoundError:
            self._commit(job, _Outcome(JobState.FAILED, "spooled file is missing"))
            return None
        except Exception as exc:  # the listener checked framing; this is rare
            reason = f"spooled file cannot be read: {type(exc).__name__}: {exc}"
            self._commit(job, _Outcome(JobState.FAILED, reason[:500]))
            return None
        decision = evaluate(self.context.rules, dataset, job.calling_ae, job.called_ae)
        if decision.pipeline == PIPELINE_NONE:
            if self._commit(job, _Outcome(JobState.SKIPPED, decision.reason)):
                # The reason quotes attribute values; the job keeps it, the log does not.
                log.info(
                    "job skipped: routed to no pipeline",
                    job_id=job.job_id,
                    sop_instance_uid=job.sop_instance_uid,
                    rule=decision.rule,
                )
            return None
        return _Work(job, dataset, decision)

    def _infer(self, works: list[_Work]) -> list[ImageResult] | None:
        """One engine call for the batch; an engine crash re-queues every job in it."""
        try:
            return self.engine.analyze([work.dataset for work in works])
        except Exception as exc:
            log.exception("engine failed on a batch", jobs=[w.job.job_id for w in works])
            for work in works:
                self._retry(work.job, f"engine failed: {type(exc).__name__}: {exc}")
            return None

    def _complete(self, work: _Work, result: ImageResult) -> None:
        try:
            outcome = self._outcome(work, result)
            committed = self._commit(work.job, outcome)
        except Exception as exc:
            log.exception("job failed unexpectedly", job_id=work.job.job_id)
            self._retry(work.job, f"{type(exc).__name__}: {exc}")
            return
        if committed:
            self._log_finished(work, result, outcome)

    def _outcome(self, work: _Work, result: ImageResult) -> _Outcome:
        if result.status == SCORED and result.findings:
            outputs = self._write_outputs(work, result, self._priority_with(work, result))
            record = self._record(work, result, outputs)
            return _Outcome(JobState.DONE, None, record, outputs, work.decision.destinations)
        record = self._record(work, result, [])
        state = JobState.FAILED if result.status == ERROR else JobState.SKIPPED
        reason = result.reason or f"engine returned {result.status} without findings"
        # No outputs, but the rule's destinations: this job may finish a scored study.
        return _Outcome(state, reason, record, destinations=work.decision.destinations)

    def _priority_with(self, work: _Work, result: ImageResult) -> StudyPriority:
        """The study's priority once this image's result counts (for the SR to report)."""
        with session_scope(self.context.sessions) as session:
            others = study_findings(
                session, work.job.study_id, except_sop_instance_uid=work.job.sop_instance_uid
            )
        mine = [finding.as_dict() for finding in result.findings]
        return study_priority([*others, *mine], self.context.priority)

    def _write_outputs(
        self, work: _Work, result: ImageResult, priority: StudyPriority
    ) -> list[Output]:
        job = work.job
        made = build_outputs(
            work.dataset,
            result,
            equipment=self.context.equipment,
            # Deterministic: a re-run of this job rebuilds the same object, not a newer one.
            content_datetime=job.created_at.astimezone().replace(tzinfo=None),
            source_variant=job.sha256 if job.version > 1 else None,
            priority=priority.report_value,
        )
        return write_outputs(self.context.spool, made)

    def _record(self, work: _Work, result: ImageResult, outputs: list[Output]) -> ResultRecord:
        by_kind = {output.kind: output for output in outputs}
        sr, sc = by_kind.get("sr"), by_kind.get("sc")
        timings = dict(result.timings_ms)
        timings["job"] = (time.perf_counter() - work.started) * 1000
        return ResultRecord(
            instance_id=work.job.instance_id,
            job_id=work.job.job_id,
            pipeline=work.decision.pipeline,
            model_key=self.engine.identity,
            status=_STATUS[result.status],
            reason=result.reason or None,
            findings=[finding.as_dict() for finding in result.findings],
            in_domain=result.in_domain,
            ood_distance=result.ood_distance,
            warnings=list(result.warnings),
            timings_ms={key: round(value, 1) for key, value in timings.items()},
            sr_sop_instance_uid=sr.sop_instance_uid if sr else None,
            sr_path=sr.relpath if sr else None,
            sc_sop_instance_uid=sc.sop_instance_uid if sc else None,
            sc_path=sc.relpath if sc else None,
        )

    # -- transactions --------------------------------------------------------------------

    def _commit(self, job: ClaimedJob, outcome: _Outcome) -> bool:
        """Result row, sends and the job's final state in one transaction.

        Returns False (and changes nothing) when the job is no longer ours.
        """
        with session_scope(self.context.sessions) as session:
            row = self._own_job(session, job)
            if row is None:
                return False
            queued = self._record_and_enqueue(session, job, outcome)
            transition(session, row, outcome.state, actor=self.worker_id, error=outcome.reason)
        if queued and self.context.sends_wakeup is not None:
            self.context.sends_wakeup.notify()
        return True

    def _record_and_enqueue(self, session: Session, job: ClaimedJob, outcome: _Outcome) -> int:
        if outcome.record is None:
            return 0
        result_row = record_result(session, outcome.record, actor=self.worker_id)
        study = locked_study(session, job.study_id)
        findings = study_findings(session, study.id)  # read under the lock: this image's too
        update_study_priority(
            session,
            study,
            findings,
            self.context.priority,
            actor=self.worker_id,
            job_id=job.job_id,
        )
        queued = 0
        for destination in outcome.destinations:
            if self._notified(destination):
                continue  # an HL7 destination: the study's message, not the SR and SC
            for output in outcome.outputs:
                item = OutgoingObject(
                    destination=destination,
                    kind=output.kind,
                    sop_class_uid=output.sop_class_uid,
                    sop_instance_uid=output.sop_instance_uid,
                    study_instance_uid=output.study_instance_uid,
                    file_path=output.relpath,
                    instance_id=job.instance_id,
                    result_id=result_row.id,
                )
                if enqueue_send(session, item, actor=self.worker_id) is not None:
                    queued += 1
        if self.context.notifier is not None:
            queued += self.context.notifier.study_finished(
                session,
                self.context.spool,
                study,
                findings,
                job_id=job.job_id,
                instance_id=job.instance_id,
                result_id=result_row.id,
                destinations=outcome.destinations,
                actor=self.worker_id,
            )
        return queued

    def _notified(self, destination: str) -> bool:
        return self.context.notifier is not None and self.context.notifier.handles(destination)

    def _own_job(self, session: Session, job: ClaimedJob) -> Job | None:
        row = session.get(Job, job.job_id, with_for_update=True)
        if row is None or row.state is not JobState.RUNNING or row.worker != self.worker_id:
            log.warning(
                "job was taken over by another worker; result dropped",
                job_id=job.job_id,
                sop_instance_uid=job.sop_instance_uid,
            )
            return None
        return row

    def _retry(self, job: ClaimedJob, error: str) -> None:
        """Back to the queue (with a delay) while attempts remain; else failed."""
        try:
            with session_scope(self.context.sessions) as session:
                row = self._own_job(session, job)
                if row is not None:
                    fail(session, row, error, actor=self.worker_id, retry_delay=RETRY_DELAY)
        except Exception:  # the database may be the problem; the lease will recover the job
            log.exception("could not record job failure", job_id=job.job_id)

    def _log_finished(self, work: _Work, result: ImageResult, outcome: _Outcome) -> None:
        log.info(
            f"job {outcome.state.value}",
            job_id=work.job.job_id,
            sop_instance_uid=work.job.sop_instance_uid,
            rule=work.decision.rule,
            status=result.status,
            findings=[
                {"code": f.label.code, "probability": round(f.probability, 4), "present": f.present}
                for f in result.findings
            ],
            outputs=[output.sop_instance_uid for output in outcome.outputs],
            sends=len(outcome.outputs) * len(outcome.destinations),
            elapsed_ms=round((time.perf_counter() - work.started) * 1000, 1),
        )


_STATUS = {
    SCORED: ResultStatus.SCORED,
    NOT_SCORED: ResultStatus.NOT_SCORED,
    ERROR: ResultStatus.ERROR,
}
