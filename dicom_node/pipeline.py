"""One batch of claimed jobs: read → route → infer → write outputs → commit.

For each claimed job the spooled file is read and routed (:mod:`dicom_node.rules`, with
the calling and called AE titles the image arrived with). Jobs routed to the cascade are
analysed together — one ``analyze`` call, so a burst shares its forward passes — and each
outcome is then committed on its own, in **one** transaction of three named steps:

1. :meth:`Pipeline._record` — the ``results`` row;
2. :meth:`Pipeline._reprioritise` — the study, locked, gets its priority recomputed from
   the latest findings of all its images; the outputs that report it (the SR) are built
   now, so they state the level the study ends this transaction with;
3. :meth:`Pipeline._fan_out` — one outbox entry per *output × object destination*, and
   the study-level notification for the destinations that take study events (a type
   declares which it takes, :mod:`dicom_node.dispatch`).

Then the job's final state. There is no moment at which a job is ``done`` without its
sends queued, or sends exist for a job that is not. Which outputs an image gets is its
rule's ``outputs`` (:mod:`dicom_node.results.registry`); outputs that do not need the
priority (the heatmap SC, the costly one) are built and written before the transaction.

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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import cached_property

import pydicom
from pydicom.dataset import Dataset
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.analyzer import Analyzer
from dicom_node.config import PrioritySettings
from dicom_node.dispatch import Destination
from dicom_node.logs import get_logger
from dicom_node.models.scores import score_rows
from dicom_node.notify import StudyNotifier
from dicom_node.outputs import Output, build_outputs, write_outputs
from dicom_node.priority import (
    StudyPriority,
    locked_study,
    study_findings,
    update_study_priority,
)
from dicom_node.results.common import Equipment
from dicom_node.results.registry import BuildInputs, OutputType, output_types
from dicom_node.rules import PIPELINE_NONE, RouteDecision, RuleSet, evaluate
from dicom_node.wakeup import Wakeup
from inference.cascade import ERROR, NOT_SCORED, SCORED, ImageResult
from inference.reference import input_descriptors
from storage.db import session_scope
from storage.models import Job, JobState, ModelScore, Result, ResultStatus, Study
from storage.outbox import OutgoingObject, enqueue_send
from storage.queue import fail, transition
from storage.registry import ACTIVE, SHADOW, record_scores
from storage.results import OutputFile, ResultRecord, record_result, set_outputs
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

    @cached_property
    def descriptors(self) -> dict[str, str | float | None]:
        """The header descriptors monitoring keeps (read once for active and shadow)."""
        return input_descriptors(self.dataset)


WriteLate = Callable[[StudyPriority], list[Output]]
"""Builds and writes the outputs that report the study's priority (called under the lock)."""


@dataclass(frozen=True)
class _Outcome:
    """What to commit for one job."""

    state: JobState
    reason: str | None
    record: ResultRecord | None = None
    outputs: Sequence[Output] = ()  # written before the transaction
    write_late: WriteLate | None = None
    destinations: Sequence[str] = ()
    scores: Sequence[ModelScore] = ()  # each finding's answer, for monitoring


@dataclass(frozen=True)
class PipelineContext:
    """What a pipeline needs from the node (one per worker thread, with its own analyzer)."""

    sessions: sessionmaker[Session]
    spool: Spool
    rules: RuleSet
    equipment: Equipment
    destinations: Mapping[str, Destination] = field(default_factory=dict)
    sends_wakeup: Wakeup | None = None
    notifier: StudyNotifier | None = None  # study-event destinations: a message per study
    priority: PrioritySettings = field(default_factory=PrioritySettings)


class Pipeline:
    """Runs batches of claimed jobs for one worker with one analyzer."""

    def __init__(self, context: PipelineContext, analyzer: Analyzer, worker_id: str) -> None:
        self.context = context
        self.analyzer = analyzer
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
        self._shadow(works)

    # -- steps before the transaction ----------------------------------------------------

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
            if self._commit(job, _Outcome(JobState.SKIPPED, decision.reason)) is not None:
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
        """One analyzer call for the batch; an analyzer crash re-queues every job in it."""
        try:
            return self.analyzer.analyze([work.dataset for work in works])
        except Exception as exc:
            log.exception("analyzer failed on a batch", jobs=[w.job.job_id for w in works])
            for work in works:
                self._retry(work.job, f"analyzer failed: {type(exc).__name__}: {exc}")
            return None

    def _complete(self, work: _Work, result: ImageResult) -> None:
        try:
            outcome = self._outcome(work, result)
            outputs = self._commit(work.job, outcome)
        except Exception as exc:
            log.exception("job failed unexpectedly", job_id=work.job.job_id)
            self._retry(work.job, f"{type(exc).__name__}: {exc}")
            return
        if outputs is not None:
            self._log_finished(work, result, outcome, outputs)

    def _outcome(self, work: _Work, result: ImageResult) -> _Outcome:
        record = self._result_record(work, result)
        scores = self._scores(work, result)
        destinations = work.decision.destinations
        if result.status == SCORED and result.findings:
            types = output_types(work.decision.outputs)
            early = [t for t in types if not t.needs_priority]
            late = [t for t in types if t.needs_priority]
            made = frozenset(t.name for t in types if t.applies_to(result))
            outputs = self._write_outputs(work, result, early, None, made)

            def write_late(priority: StudyPriority) -> list[Output]:
                return self._write_outputs(work, result, late, priority.report_value, made)

            return _Outcome(JobState.DONE, None, record, outputs, write_late, destinations, scores)
        state = JobState.FAILED if result.status == ERROR else JobState.SKIPPED
        reason = result.reason or f"engine returned {result.status} without findings"
        # No outputs, but the rule's destinations: this job may finish a scored study.
        return _Outcome(state, reason, record, destinations=destinations, scores=scores)

    def _scores(
        self,
        work: _Work,
        result: ImageResult,
        role: str = ACTIVE,
        only: tuple[str, str, str] | None = None,
    ) -> list[ModelScore]:
        """Each finding's answer and the image's descriptors (:mod:`dicom_node.models.scores`)."""
        return score_rows(
            result,
            instance_id=work.job.instance_id,
            sop_instance_uid=work.job.sop_instance_uid,
            study_instance_uid=str(work.dataset.get("StudyInstanceUID", "")),
            descriptors=work.descriptors,
            decision=getattr(self.analyzer, "decision", {}),
            role=role,
            only=only,
        )

    def _shadow(self, works: Sequence[_Work]) -> None:
        """The shadow runs on this batch, after the active results are committed: their
        scores are stored and nothing is built or sent. A failure costs only the shadow."""
        run = getattr(self.analyzer, "shadow", None)
        if run is None:
            return
        try:
            for shadow, results in run([work.dataset for work in works]):
                rows = [
                    row
                    for work, result in zip(works, results, strict=True)
                    for row in self._scores(work, result, SHADOW, shadow.only)
                ]
                with session_scope(self.context.sessions) as session:
                    record_scores(session, rows)
        except Exception:
            log.exception("shadow run failed; the active results are not affected")

    def _write_outputs(
        self,
        work: _Work,
        result: ImageResult,
        types: Sequence[OutputType],
        priority: str | None,
        made: frozenset[str],
    ) -> list[Output]:
        if not types:
            return []
        job = work.job
        inputs = BuildInputs(
            source=work.dataset,
            result=result,
            equipment=self.context.equipment,
            # Deterministic: a re-run of this job rebuilds the same object, not a newer one.
            content_datetime=job.created_at.astimezone().replace(tzinfo=None),
            source_variant=job.sha256 if job.version > 1 else None,
            priority=priority,
            companions=made,
        )
        return write_outputs(self.context.spool, build_outputs(types, inputs))

    def _result_record(self, work: _Work, result: ImageResult) -> ResultRecord:
        timings = dict(result.timings_ms)
        timings["job"] = (time.perf_counter() - work.started) * 1000
        return ResultRecord(
            instance_id=work.job.instance_id,
            job_id=work.job.job_id,
            pipeline=work.decision.pipeline,
            model_key=self.analyzer.identity,
            status=_STATUS[result.status],
            reason=result.reason or None,
            findings=result.findings_as_dicts(),  # not-assessed ones too, with the reason
            in_domain=result.in_domain,
            ood_distance=result.ood_distance,
            warnings=list(result.warnings),
            timings_ms={key: round(value, 1) for key, value in timings.items()},
            measurements=[m.as_dict() for m in result.anatomy.measurements]
            if result.anatomy is not None
            else [],
        )

    # -- the transaction: record → re-prioritise → fan out --------------------------------

    def _commit(self, job: ClaimedJob, outcome: _Outcome) -> list[Output] | None:
        """Result row, study priority, sends and the job's final state in one transaction.

        Returns the job's outputs, or None (and changes nothing) when the job is no longer
        ours.
        """
        queued = 0
        outputs = [*outcome.outputs]
        with session_scope(self.context.sessions) as session:
            row = self._own_job(session, job)
            if row is None:
                return None
            if outcome.record is not None:
                result_row = self._record(session, outcome.record)
                record_scores(session, outcome.scores)
                study, findings, priority = self._reprioritise(session, job)
                if outcome.write_late is not None:
                    outputs += outcome.write_late(priority)
                set_outputs(result_row, [_file(output) for output in outputs])
                queued = self._fan_out(session, job, result_row, study, findings, outputs, outcome)
            transition(session, row, outcome.state, actor=self.worker_id, error=outcome.reason)
        if queued and self.context.sends_wakeup is not None:
            self.context.sends_wakeup.notify()
        return outputs

    def _record(self, session: Session, record: ResultRecord) -> Result:
        """Step 1: insert or update the result row (flushed: the study's findings see it)."""
        return record_result(session, record, actor=self.worker_id)

    def _reprioritise(
        self, session: Session, job: ClaimedJob
    ) -> tuple[Study, list[dict[str, object]], StudyPriority]:
        """Step 2: lock the study and recompute its priority, once, from every image's
        latest findings (this one's included). The lock serialises workers finishing images
        of the same study, so the level an SR reports is the one the study is left with."""
        study = locked_study(session, job.study_id)
        findings = study_findings(session, study.id)
        priority = update_study_priority(
            session,
            study,
            findings,
            self.context.priority,
            actor=self.worker_id,
            job_id=job.job_id,
        )
        return study, findings, priority

    def _fan_out(
        self,
        session: Session,
        job: ClaimedJob,
        result_row: Result,
        study: Study,
        findings: list[dict[str, object]],
        outputs: Sequence[Output],
        outcome: _Outcome,
    ) -> int:
        """Step 3: every output to every destination that takes objects; the study's
        message to those that take study events (sent once the study is finished).
        Returns the number of sends queued."""
        takes_objects = [n for n in outcome.destinations if self._delivers(n) == "objects"]
        takes_events = [n for n in outcome.destinations if self._delivers(n) == "study_events"]
        queued = 0
        for destination in takes_objects:
            for output in outputs:
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
        if takes_events and self.context.notifier is not None:
            queued += self.context.notifier.study_finished(
                session,
                self.context.spool,
                study,
                findings,
                job_id=job.job_id,
                instance_id=job.instance_id,
                result_id=result_row.id,
                destinations=[self.context.destinations[name] for name in takes_events],
                actor=self.worker_id,
            )
        return queued

    def _delivers(self, name: str) -> str:
        """What a destination takes; a name missing from the context (tests that build
        a bare context) is an object destination, the default type's behaviour."""
        destination = self.context.destinations.get(name)
        return "objects" if destination is None else destination.delivers

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

    def _log_finished(
        self, work: _Work, result: ImageResult, outcome: _Outcome, outputs: Sequence[Output]
    ) -> None:
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
            outputs=[output.sop_instance_uid for output in outputs],
            destinations=len(outcome.destinations),
            elapsed_ms=round((time.perf_counter() - work.started) * 1000, 1),
        )


def _file(output: Output) -> OutputFile:
    return OutputFile(output.kind, output.sop_class_uid, output.sop_instance_uid, output.relpath)


_STATUS = {
    SCORED: ResultStatus.SCORED,
    NOT_SCORED: ResultStatus.NOT_SCORED,
    ERROR: ResultStatus.ERROR,
}
