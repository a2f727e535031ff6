"""The worker pipeline on both backends: job states, results, outputs, sends, crash re-runs.

Real receive path, database, spool, rules and result builders; a fake analyzer
(:class:`tests.pipeline_support.FakeAnalyzer`) so each test takes a second, not a minute.
Every SR and SC the pipeline writes here is checked with ``dciodvfy``.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.analyzer import synthetic_radiograph
from dicom_node.pipeline import Pipeline
from dicom_node.receive import StoreService
from dicom_node.results.sr import measurement_report
from dicom_node.worker import Worker, claim_jobs
from inference.cascade import ImageResult
from storage import queue
from storage.db import session_scope
from storage.models import AuditEvent, Job, JobState, Result, ResultStatus, Send, SendState
from storage.spool import Spool
from tests.dciodvfy import dciodvfy
from tests.pipeline_support import (
    WORKER_ID,
    FakeAnalyzer,
    destination_toml,
    make_pipeline,
    receive_file,
    run_queue,
    settings_for,
)
from tests.results_data import make_finding, make_result

CHEST = "siim-cr-jpegbaseline.dcm"
CHEST_2 = "nih-00000001_000-dx-sc.dcm"
HIP = "rg2-hip-cr-jpegextended.dcm"
DENTAL = "dental-cr-modality-lut-jpeglossless.dcm"  # CR without body part: routed, not chest
TWO_DESTINATIONS = destination_toml("pacs", 11104) + destination_toml("backup", 11105, "BACKUP")


@pytest.fixture
def fake_analyzer() -> FakeAnalyzer:
    return FakeAnalyzer()


@pytest.fixture
def pipeline(
    tmp_path: Path,
    database_url: str,
    sessions: sessionmaker[Session],
    spool: Spool,
    fake_analyzer: FakeAnalyzer,
) -> Pipeline:
    settings = settings_for(tmp_path, database_url, TWO_DESTINATIONS)
    return make_pipeline(settings, sessions, spool, fake_analyzer)


def job_of(sessions: sessionmaker[Session], instance_id: int) -> Job:
    with session_scope(sessions) as s:
        job = s.scalars(select(Job).where(Job.instance_id == instance_id).order_by(Job.id)).first()
        assert job is not None
        return job


def results_of(sessions: sessionmaker[Session], instance_id: int) -> list[Result]:
    with session_scope(sessions) as s:
        return list(s.scalars(select(Result).where(Result.instance_id == instance_id)))


def sends_of(sessions: sessionmaker[Session], instance_id: int | None = None) -> list[Send]:
    with session_scope(sessions) as s:
        query = select(Send).order_by(Send.id)
        if instance_id is not None:
            query = query.where(Send.instance_id == instance_id)
        return list(s.scalars(query))


# -- outcomes -------------------------------------------------------------------------------


def test_scored_image_gets_sr_sc_result_and_one_send_per_destination_and_output(
    pipeline: Pipeline,
    store: StoreService,
    sessions: sessionmaker[Session],
    spool: Spool,
    data: Path,
) -> None:
    instance_id = receive_file(store, data / CHEST)
    assert run_queue(pipeline, sessions) == 1

    job = job_of(sessions, instance_id)
    assert (job.state, job.attempts, job.last_error) == (JobState.DONE, 1, None)
    (result,) = results_of(sessions, instance_id)
    assert result.status is ResultStatus.SCORED and result.reason is None
    assert result.model_key == FakeAnalyzer().identity and result.pipeline == "cxr-cascade"
    (finding,) = result.findings
    assert finding["code"] == "233604007" and finding["probability"] == 0.8731
    assert finding["present"] is True and finding["stage"] == "confirm"
    assert result.sr_path and result.sc_path and "job" in result.timings_ms

    sr = pydicom.dcmread(spool.path_of(result.sr_path))
    sc = pydicom.dcmread(spool.path_of(result.sc_path))
    source = pydicom.dcmread(data / CHEST, stop_before_pixels=True)
    assert sr.SOPInstanceUID == result.sr_sop_instance_uid
    assert sc.SOPInstanceUID == result.sc_sop_instance_uid
    assert sr.StudyInstanceUID == sc.StudyInstanceUID == source.StudyInstanceUID
    sends = sends_of(sessions, instance_id)
    assert sorted((s.destination, s.kind) for s in sends) == [
        ("backup", "sc"),
        ("backup", "sr"),
        ("pacs", "sc"),
        ("pacs", "sr"),
    ]
    assert {s.state for s in sends} == {SendState.PENDING}
    assert {s.file_path for s in sends} == {result.sr_path, result.sc_path}


def test_outputs_written_by_the_pipeline_pass_dciodvfy(
    pipeline: Pipeline,
    store: StoreService,
    sessions: sessionmaker[Session],
    spool: Spool,
    data: Path,
) -> None:
    ids = [receive_file(store, data / name) for name in (CHEST, CHEST_2)]
    run_queue(pipeline, sessions)
    for instance_id in ids:
        (result,) = results_of(sessions, instance_id)
        for relpath, iod in ((result.sr_path, "Comprehensive3DSR"), (result.sc_path, "SCImage")):
            assert relpath is not None
            report = dciodvfy(spool.path_of(relpath))
            assert report.iod == iod and report.errors == [], report.output
            assert report.unexpected_warnings == [], report.output


def test_not_scored_image_is_skipped_with_the_reason_and_no_outputs(
    pipeline: Pipeline, store: StoreService, sessions: sessionmaker[Session], data: Path
) -> None:
    instance_id = receive_file(store, data / DENTAL)
    run_queue(pipeline, sessions)
    job = job_of(sessions, instance_id)
    assert job.state is JobState.SKIPPED
    assert job.last_error and "TEETH" in job.last_error  # the gate's reason
    (result,) = results_of(sessions, instance_id)
    assert result.status is ResultStatus.NOT_SCORED and result.reason == job.last_error
    assert (result.sr_path, result.sc_path, result.findings) == (None, None, [])
    assert sends_of(sessions) == []


def test_decode_error_fails_the_job_once_without_retry(
    pipeline: Pipeline,
    store: StoreService,
    sessions: sessionmaker[Session],
    data: Path,
    fake_analyzer: FakeAnalyzer,
) -> None:
    source = pydicom.dcmread(data / CHEST, stop_before_pixels=True)
    fake_analyzer.errors.add(str(source.SOPInstanceUID))
    instance_id = receive_file(store, data / CHEST)
    run_queue(pipeline, sessions)
    job = job_of(sessions, instance_id)
    assert (job.state, job.attempts) == (JobState.FAILED, 1)
    assert job.last_error and "cannot decode" in job.last_error
    assert results_of(sessions, instance_id)[0].status is ResultStatus.ERROR
    assert sends_of(sessions) == []


def test_routed_to_no_pipeline_is_skipped_with_the_rules_reason(
    pipeline: Pipeline,
    store: StoreService,
    sessions: sessionmaker[Session],
    data: Path,
    fake_analyzer: FakeAnalyzer,
) -> None:
    instance_id = receive_file(store, data / HIP)
    run_queue(pipeline, sessions)
    job = job_of(sessions, instance_id)
    assert job.state is JobState.SKIPPED
    assert job.last_error and job.last_error.startswith("no rule matched")
    assert "BodyPartExamined" in job.last_error
    assert fake_analyzer.batches == [] and results_of(sessions, instance_id) == []


def test_rules_route_by_calling_ae_and_choose_destinations(
    tmp_path: Path,
    database_url: str,
    sessions: sessionmaker[Session],
    spool: Spool,
    store: StoreService,
    data: Path,
) -> None:
    toml = (
        TWO_DESTINATIONS
        + """
[[rules]]
name = "research-scanner"
pipeline = "none"
[rules.match]
calling_aet = "RESEARCH"

[[rules]]
name = "chest-to-backup"
pipeline = "cxr-cascade"
destinations = ["backup"]
"""
    )
    pipeline = make_pipeline(
        settings_for(tmp_path, database_url, toml), sessions, spool, FakeAnalyzer()
    )
    research = receive_file(store, data / CHEST, calling_ae="RESEARCH")
    clinical = receive_file(store, data / CHEST_2, calling_ae="CR_ROOM_1")
    run_queue(pipeline, sessions)
    assert job_of(sessions, research).state is JobState.SKIPPED
    assert "research-scanner" in (job_of(sessions, research).last_error or "")
    assert job_of(sessions, clinical).state is JobState.DONE
    assert {s.destination for s in sends_of(sessions)} == {"backup"}


def test_burst_is_analysed_in_one_analyzer_call(
    pipeline: Pipeline,
    store: StoreService,
    sessions: sessionmaker[Session],
    data: Path,
    fake_analyzer: FakeAnalyzer,
) -> None:
    for name in (CHEST, CHEST_2, DENTAL, HIP):
        receive_file(store, data / name)
    assert run_queue(pipeline, sessions, batch_size=8) == 4
    assert fake_analyzer.batches == [3]  # the hip is routed to no pipeline, never analysed


def test_analyzer_crash_requeues_then_fails_after_max_attempts(
    pipeline: Pipeline,
    store: StoreService,
    sessions: sessionmaker[Session],
    data: Path,
    fake_analyzer: FakeAnalyzer,
) -> None:
    fake_analyzer.crash = RuntimeError("CUDA went away")
    instance_id = receive_file(store, data / CHEST)
    for attempt in range(1, 4):
        with session_scope(sessions) as s:  # make the retry due now
            s.get(Job, job_of(sessions, instance_id).id).available_at = queue.utcnow()  # type: ignore[union-attr]
        run_queue(pipeline, sessions)
        job = job_of(sessions, instance_id)
        assert job.attempts == attempt and "CUDA went away" in (job.last_error or "")
        assert job.state is (JobState.QUEUED if attempt < 3 else JobState.FAILED)
    assert results_of(sessions, instance_id) == [] and sends_of(sessions) == []


# -- crashes and re-runs --------------------------------------------------------------------


class Crash(BaseException):
    """Stands for the process dying: not an Exception, so nothing on the way catches it."""


def test_crash_between_outputs_and_commit_reruns_to_identical_uids_and_no_duplicate_sends(
    pipeline: Pipeline,
    store: StoreService,
    sessions: sessionmaker[Session],
    spool: Spool,
    data: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    instance_id = receive_file(store, data / CHEST)
    written: list[Path] = []
    original_fan_out = Pipeline._fan_out

    def dying_fan_out(self: Pipeline, *args: object) -> int:
        """Every output is written (the SR under the study lock); the process dies before
        the transaction commits."""
        outputs = args[5]
        written.extend(spool.path_of(o.relpath) for o in outputs)  # type: ignore[attr-defined]
        raise Crash

    monkeypatch.setattr(Pipeline, "_fan_out", dying_fan_out)
    jobs = claim_jobs(sessions, WORKER_ID, limit=8, lease=timedelta(minutes=5))
    with pytest.raises(Crash):
        pipeline.run(jobs)
    first_bytes = {path.name: path.read_bytes() for path in written}
    assert len(first_bytes) == 2
    assert job_of(sessions, instance_id).state is JobState.RUNNING  # as a dead process leaves it
    assert results_of(sessions, instance_id) == [] and sends_of(sessions) == []

    monkeypatch.setattr(Pipeline, "_fan_out", original_fan_out)
    with session_scope(sessions) as s:  # the node restarts on this host: the worker is gone
        assert queue.recover_orphans(s, "testhost", lambda pid: False, actor="test") == 1
    run_queue(pipeline, sessions)

    job = job_of(sessions, instance_id)
    assert (job.state, job.attempts) == (JobState.DONE, 2)
    (result,) = results_of(sessions, instance_id)
    assert {Path(result.sr_path or "").name, Path(result.sc_path or "").name} == set(first_bytes)
    for name, content in first_bytes.items():  # same object, not merely the same UID
        assert (
            spool.outputs_dir / ("sr" if name in (result.sr_path or "") else "sc") / name
        ).read_bytes() == content
    assert len(sends_of(sessions)) == 4


def test_rerun_of_a_finished_image_updates_its_result_and_queues_nothing_twice(
    pipeline: Pipeline, store: StoreService, sessions: sessionmaker[Session], data: Path
) -> None:
    instance_id = receive_file(store, data / CHEST)
    run_queue(pipeline, sessions)
    (first,) = results_of(sessions, instance_id)
    with session_scope(sessions) as s:  # an operator asks for the image to be analysed again
        queue.enqueue(s, instance_id, actor="test")
    run_queue(pipeline, sessions)
    (again,) = results_of(sessions, instance_id)
    assert again.id == first.id and again.sr_sop_instance_uid == first.sr_sop_instance_uid
    assert again.updated_at > first.updated_at
    assert len(sends_of(sessions)) == 4
    with session_scope(sessions) as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 2


def test_expired_lease_lets_another_worker_finish_and_drops_the_late_result(
    pipeline: Pipeline,
    store: StoreService,
    sessions: sessionmaker[Session],
    data: Path,
    tmp_path: Path,
    database_url: str,
    spool: Spool,
) -> None:
    instance_id = receive_file(store, data / CHEST)
    stale = claim_jobs(sessions, WORKER_ID, limit=1, lease=timedelta(seconds=-1))
    other = make_pipeline(
        settings_for(tmp_path, database_url, TWO_DESTINATIONS), sessions, spool, FakeAnalyzer()
    )
    other.worker_id = "otherhost:7:worker-1"
    taken = claim_jobs(sessions, other.worker_id, limit=1, lease=timedelta(minutes=5))
    assert [j.job_id for j in taken] == [j.job_id for j in stale]
    pipeline.run(stale)  # the slow first worker comes back: its result is dropped
    assert results_of(sessions, instance_id) == []
    other.run(taken)
    job = job_of(sessions, instance_id)
    assert (job.state, job.worker, job.attempts) == (JobState.DONE, other.worker_id, 2)
    assert len(sends_of(sessions)) == 4


def test_new_version_of_an_instance_gets_outputs_of_its_own(
    pipeline: Pipeline, store: StoreService, sessions: sessionmaker[Session], data: Path
) -> None:
    """Same SOP Instance UID, different bytes: two results, two SRs, never one UID for both."""
    first = receive_file(store, data / "siim-cr-jpegbaseline.dcm")
    second = receive_file(store, data / "siim-cr-jpegbaseline-mono1-header.dcm")
    run_queue(pipeline, sessions)
    (a,), (b,) = results_of(sessions, first), results_of(sessions, second)
    assert a.sr_sop_instance_uid != b.sr_sop_instance_uid
    assert a.sc_sop_instance_uid != b.sc_sop_instance_uid
    source = pydicom.dcmread(data / "siim-cr-jpegbaseline.dcm")
    result = make_result(source, [make_finding(True, "confirm")])
    plain = measurement_report(source, result, priority="urgent")  # p 0.87, confirmed
    assert a.sr_sop_instance_uid == plain.SOPInstanceUID  # version 1 keeps the plain UIDs


def test_unreadable_spooled_file_fails_the_job(
    pipeline: Pipeline,
    store: StoreService,
    sessions: sessionmaker[Session],
    spool: Spool,
    data: Path,
) -> None:
    instance_id = receive_file(store, data / CHEST)
    with session_scope(sessions) as s:
        (row,) = [j.instance for j in s.scalars(select(Job))]
        spool.path_of(row.spool_path).unlink()
    run_queue(pipeline, sessions)
    job = job_of(sessions, instance_id)
    assert (job.state, job.last_error) == (JobState.FAILED, "spooled file is missing")


# -- the worker service ---------------------------------------------------------------------


@pytest.fixture
def worker_service(
    tmp_path: Path,
    database_url: str,
    sessions: sessionmaker[Session],
    spool: Spool,
) -> Iterator[tuple[Worker, FakeAnalyzer]]:
    from dicom_node.wakeup import Wakeup

    settings = settings_for(tmp_path, database_url, "[worker]\npoll_interval = 60\n")
    analyzer = FakeAnalyzer()
    worker = Worker(
        settings, sessions, spool, jobs_wakeup=Wakeup(), analyzer_factory=lambda: analyzer
    )
    worker.start()
    try:
        assert worker.ready.wait(60)
        yield worker, analyzer
    finally:
        worker.stop()


def test_worker_wakes_on_notification_not_on_poll(
    worker_service: tuple[Worker, FakeAnalyzer],
    store: StoreService,
    sessions: sessionmaker[Session],
    data: Path,
) -> None:
    import time

    worker, _ = worker_service
    store.on_queued = worker.jobs_wakeup.notify
    started = time.monotonic()
    instance_id = receive_file(store, data / CHEST)
    while job_of(sessions, instance_id).state is not JobState.DONE:
        assert time.monotonic() - started < 30, "job not processed"
        time.sleep(0.02)
    assert time.monotonic() - started < 30  # poll interval is 60 s: it was the wake-up


def test_analyzer_that_cannot_load_leaves_jobs_queued(
    tmp_path: Path,
    database_url: str,
    sessions: sessionmaker[Session],
    spool: Spool,
    store: StoreService,
    data: Path,
) -> None:
    from dicom_node.wakeup import Wakeup

    def broken() -> FakeAnalyzer:
        raise FileNotFoundError("bundle missing")

    settings = settings_for(tmp_path, database_url)
    worker = Worker(settings, sessions, spool, jobs_wakeup=Wakeup(), analyzer_factory=broken)
    worker.start()
    try:
        instance_id = receive_file(store, data / CHEST)
        worker.jobs_wakeup.notify()
        assert not worker.ready.wait(1)
        assert job_of(sessions, instance_id).state is JobState.QUEUED
    finally:
        worker.stop()


def test_recover_orphans_only_touches_dead_local_processes(
    store: StoreService, sessions: sessionmaker[Session], data: Path
) -> None:
    receive_file(store, data / CHEST)
    receive_file(store, data / CHEST_2)
    host = socket.gethostname()
    with session_scope(sessions) as s:
        queue.claim_next(s, f"{host}:999999:worker-1")
        queue.claim_next(s, "elsewhere:999999:worker-1")
    with session_scope(sessions) as s:
        assert queue.recover_orphans(s, host, lambda pid: pid != 999999, actor="t") == 1
        states = sorted(j.state.value for j in s.scalars(select(Job)))
    assert states == ["queued", "running"]


def test_warm_up_dataset_is_a_valid_source() -> None:
    """The synthetic radiograph used to warm the analyzer up builds a valid SR."""
    source = synthetic_radiograph(64)
    report = measurement_report(source, make_result(source, [make_finding()]))
    assert report.StudyInstanceUID == source.StudyInstanceUID


# -- leases with several workers ------------------------------------------------------------


@dataclass
class SlowAnalyzer(FakeAnalyzer):
    """Takes ``seconds`` per batch: longer than the test's job lease."""

    seconds: float = 2.5

    def analyze(self, datasets: Sequence[Dataset]) -> list[ImageResult]:
        time.sleep(self.seconds)
        return super().analyze(datasets)


def short_lease_worker(
    tmp_path: Path,
    database_url: str,
    sessions: sessionmaker[Session],
    spool: Spool,
    analyzer: FakeAnalyzer,
) -> Worker:
    from dicom_node.wakeup import Wakeup

    toml = "[worker]\npoll_interval = 60\njob_lease = 0.8\n"
    settings = settings_for(tmp_path, database_url, toml)
    return Worker(
        settings, sessions, spool, jobs_wakeup=Wakeup(), analyzer_factory=lambda: analyzer
    )


def running_claims(sessions: sessionmaker[Session], job_id: int) -> int:
    with session_scope(sessions) as s:
        query = select(func.count()).select_from(AuditEvent)
        return int(
            s.scalar(query.where(AuditEvent.kind == "job.running", AuditEvent.job_id == job_id))
            or 0
        )


def test_job_longer_than_its_lease_is_not_taken_over_while_its_worker_lives(
    tmp_path: Path,
    database_url: str,
    sessions: sessionmaker[Session],
    spool: Spool,
    store: StoreService,
    data: Path,
) -> None:
    worker = short_lease_worker(tmp_path, database_url, sessions, spool, SlowAnalyzer())
    worker.start()
    try:
        assert worker.ready.wait(60)
        instance_id = receive_file(store, data / CHEST)
        worker.jobs_wakeup.notify()
        while job_of(sessions, instance_id).state is JobState.QUEUED:
            time.sleep(0.02)
        while job_of(sessions, instance_id).state is JobState.RUNNING:  # 2.5 s > 0.8 s lease
            rival = claim_jobs(
                sessions, "otherhost:7:worker-1", limit=8, lease=timedelta(minutes=5)
            )
            assert rival == [], "a live worker's job was taken over"
            time.sleep(0.1)
    finally:
        worker.stop()
    job = job_of(sessions, instance_id)
    assert (job.state, job.attempts) == (JobState.DONE, 1)
    assert running_claims(sessions, job.id) == 1


def test_expired_lease_of_a_dead_worker_elsewhere_is_taken_back_without_a_poll(
    tmp_path: Path,
    database_url: str,
    sessions: sessionmaker[Session],
    spool: Spool,
    store: StoreService,
    data: Path,
) -> None:
    instance_id = receive_file(store, data / CHEST)
    claim_jobs(sessions, "otherhost:7:worker-1", limit=1, lease=timedelta(seconds=1))
    worker = short_lease_worker(tmp_path, database_url, sessions, spool, FakeAnalyzer())
    worker.start()  # polls once at start (the job is not expired yet), then only every 60 s
    try:
        deadline = time.monotonic() + 30
        while job_of(sessions, instance_id).state is not JobState.DONE:
            assert time.monotonic() < deadline, "the dead worker's job was not taken back"
            time.sleep(0.05)
    finally:
        worker.stop()
    job = job_of(sessions, instance_id)
    assert job.attempts == 2 and job.worker is not None and "otherhost" not in job.worker
    assert running_claims(sessions, job.id) == 2
