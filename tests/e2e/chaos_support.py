"""Chaos across processes: ``kill -9`` of a random node process, at a random moment, while
a modality streams images; what the archive holds at the end is the verdict.

The node runs as four processes on one PostgreSQL database and one spool, the scale-out
layout of the README: ``serve --no-workers`` (the listener; it also runs a sender), two
``worker --threads 1`` (analysis, each with its sender) and one ``worker`` with no worker
threads — a sender alone. A real Orthanc is the archive.

A modality thread sends one image per association (pynetdicom), steadily over all the
rounds; an image whose association fails — the listener was just killed — is sent again
later, as a modality would, until it is acknowledged. Each round SIGKILLs one process at
a random moment of the round and starts it again at once; the victims are drawn as
shuffled turns of the four roles, so any four consecutive rounds kill each role once. At the end,
once the queue and the outbox are empty:

* **lost** — acknowledged images without exactly one SR and one heatmap SC in Orthanc
  (found through the references in the objects themselves);
* **duplicated** — source images with more than one SR or SC in Orthanc, plus sends with
  more than one ``send.sent`` audit event, plus (destination, SOP instance) pairs with more
  than one ``sent`` row;
* **resent** — sends claimed more than once (a sender died holding them): the at-least-once
  part of delivery, which Orthanc absorbs because it keeps one copy per SOP Instance UID;
  with **jobs_rerun** (jobs claimed again after their worker died) and **sends_recovered**
  it shows how much in-flight work the kills actually hit.

Used by ``tests/e2e/test_chaos.py`` (a short run) and ``bench/bench_chaos.py`` (20 rounds).
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pynetdicom import AE

from tests.e2e.orthanc import LOOPBACK, Orthanc
from tests.e2e.scale_support import chest_burst, rows, split_config, wait_for
from tests.support import NODE_AE, NodeProcess

SR_SERIES = "AI CXR findings"
SC_SERIES = "AI CXR heatmap"
ROLES = ("listener", "worker-1", "worker-2", "sender")


def node_processes(work: Path, url: str, config: Path) -> dict[str, NodeProcess]:
    spool = {"DICOM_NODE_SPOOL_DIR": str(work / "spool"), "OMP_NUM_THREADS": "1"}
    listener = NodeProcess(home=work / "listener", database_url=url, config_file=config)
    listener.extra_env = dict(spool)
    workers = {
        f"worker-{i}": NodeProcess(
            home=work / f"worker-{i}",
            database_url=url,
            config_file=config,
            workers=True,
            command=("worker", "--threads", "1"),
            extra_env=dict(spool),
        )
        for i in (1, 2)
    }
    sender = NodeProcess(  # workers=False: [worker] threads = 0, so only the sender runs
        home=work / "sender", database_url=url, config_file=config, command=("worker",)
    )
    sender.extra_env = dict(spool)
    return {"listener": listener, **workers, "sender": sender}


# -- the modality ----------------------------------------------------------------------------


@dataclass
class Modality:
    """Sends every file once acknowledged; retries those whose association failed."""

    port: int
    files: list[Path]
    interval: float
    acknowledged: dict[str, Path] = field(default_factory=dict)
    attempts: int = 0
    failures: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    _pending: deque[Path] = field(default_factory=deque)

    def run(self) -> None:
        ae = AE(ae_title="CHAOS_CR")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        datasets = {path: pydicom.dcmread(path) for path in self.files}
        contexts = {(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID) for ds in datasets.values()}
        for sop_class, transfer_syntax in sorted(contexts):
            ae.add_requested_context(sop_class, transfer_syntax)
        self._pending.extend(self.files)
        next_at = time.monotonic()
        while self._pending and not self.stop.is_set():
            path = self._pending.popleft()
            self.attempts += 1
            if self._send(ae, datasets[path]):
                self.acknowledged[str(datasets[path].SOPInstanceUID)] = path
            else:
                self.failures += 1
                self._pending.append(path)  # again later, like a modality's queue
            next_at += self.interval
            self.stop.wait(max(0.0, next_at - time.monotonic()))

    def _send(self, ae: AE, dataset: pydicom.Dataset) -> bool:
        try:
            assoc = ae.associate(LOOPBACK, self.port, ae_title=NODE_AE)
        except Exception:  # noqa: BLE001 - any failure is a retry
            return False
        if not assoc.is_established:
            return False
        try:
            status = assoc.send_c_store(dataset)
            return bool(status) and int(status.Status) == 0x0000
        except Exception:  # noqa: BLE001
            return False
        finally:
            if assoc.is_established:
                assoc.release()


# -- the run ---------------------------------------------------------------------------------


@dataclass
class ChaosReport:
    rounds: int
    seed: int
    images: int
    acknowledged: int
    send_attempts: int
    lost: int
    duplicated: int
    resent: int
    kills: list[dict[str, Any]]
    seconds: float
    settle_seconds: float
    details: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        return {
            key: getattr(self, key)
            for key in (
                "rounds",
                "seed",
                "images",
                "acknowledged",
                "send_attempts",
                "lost",
                "duplicated",
                "resent",
                "seconds",
                "settle_seconds",
            )
        }


def run_chaos(
    work: Path,
    data_dir: Path,
    database_url: str,
    orthanc: Orthanc,
    *,
    rounds: int,
    images_per_round: int,
    round_s: float,
    seed: int,
    settle_timeout: float,
    log: Callable[[str], None] = lambda message: None,
) -> ChaosReport:
    """Start the four processes, stream, kill and restart one per round, settle, count."""
    rng = random.Random(seed)
    files = chest_burst(data_dir, work / "images", rounds * images_per_round)
    config = split_config(work / "node.toml", orthanc, job_lease=6)
    processes = node_processes(work, database_url, config)
    kills: list[dict[str, Any]] = []
    order = [role for _ in range(rounds) for role in rng.sample(ROLES, len(ROLES))]
    started = time.monotonic()
    try:
        for process in processes.values():
            process.start()
        modality = Modality(processes["listener"].port, files, round_s / images_per_round)
        stream = threading.Thread(target=modality.run, name="modality", daemon=True)
        stream.start()
        for index in range(rounds):
            round_start = time.monotonic()
            time.sleep(rng.uniform(0.1, 0.9) * round_s)
            role = order[index]
            victim = processes[role]
            state = _moment(database_url)
            assert victim.proc is not None
            pid = victim.proc.pid
            victim.kill9()
            victim.start()
            kills.append(
                {
                    "round": index + 1,
                    "role": role,
                    "pid": pid,
                    "at_s": round(time.monotonic() - started, 1),
                    "acknowledged_so_far": len(modality.acknowledged),
                    **state,
                }
            )
            log(f"round {index + 1}/{rounds}: killed {role} (pid {pid}) {state}")
            time.sleep(max(0.0, round_start + round_s - time.monotonic()))
            _archive_alive(orthanc)
        stream.join(timeout=settle_timeout)
        if stream.is_alive():
            modality.stop.set()
            raise TimeoutError(f"images still unacknowledged after {settle_timeout:.0f} s")
        settle_start = time.monotonic()
        acknowledged = set(modality.acknowledged)
        wait_for(
            lambda: _archive_alive(orthanc) and _settled(database_url, acknowledged),
            settle_timeout,
            "every acknowledged image analysed and its results delivered",
            every=1.0,
        )
        settle_seconds = time.monotonic() - settle_start
    finally:
        for process in processes.values():
            process.stop()
    verdict = _verdict(database_url, orthanc, acknowledged)
    return ChaosReport(
        rounds=rounds,
        seed=seed,
        images=len(files),
        acknowledged=len(acknowledged),
        send_attempts=modality.attempts,
        lost=verdict["lost"],
        duplicated=verdict["duplicated"],
        resent=verdict["resent"],
        kills=kills,
        seconds=round(time.monotonic() - started, 1),
        settle_seconds=round(settle_seconds, 1),
        details=verdict,
    )


def _archive_alive(orthanc: Orthanc) -> bool:
    """True; raises if the archive process is gone (the run would only time out)."""
    if orthanc.process is not None and orthanc.process.poll() is not None:
        raise RuntimeError(
            f"Orthanc exited ({orthanc.process.returncode}) during the run; it is not one of "
            f"the processes this run kills:\n{orthanc.log_tail()}"
        )
    return True


def _moment(url: str) -> dict[str, int]:
    """What was in flight when a process was killed."""
    jobs = dict(rows(url, "SELECT state, count(*) FROM jobs GROUP BY state"))
    sends = dict(rows(url, "SELECT state, count(*) FROM sends GROUP BY state"))
    return {
        "jobs_running": int(jobs.get("running", 0)),
        "jobs_queued": int(jobs.get("queued", 0)),
        "sends_sending": int(sends.get("sending", 0)),
        "sends_pending": int(sends.get("pending", 0)),
    }


def _settled(url: str, acknowledged: set[str]) -> bool:
    stored = {uid for (uid,) in rows(url, "SELECT sop_instance_uid FROM instances")}
    unfinished = rows(
        url, "SELECT count(*) FROM jobs WHERE state IN ('received', 'queued', 'running')"
    )
    open_sends = rows(url, "SELECT count(*) FROM sends WHERE state != 'sent'")
    return acknowledged <= stored and unfinished[0][0] == 0 and open_sends[0][0] == 0


def outputs_per_source(orthanc: Orthanc) -> dict[str, Counter[str]]:
    """For SR and SC: how many objects of the node Orthanc holds per source image."""
    found: dict[str, Counter[str]] = {"sr": Counter(), "sc": Counter()}
    for kind, series in (("sr", SR_SERIES), ("sc", SC_SERIES)):
        for instance_id in orthanc.find("Instance", {"SeriesDescription": series}):
            tags = orthanc.request("GET", f"/instances/{instance_id}/tags?simplify")
            if kind == "sr":
                (study,) = tags["CurrentRequestedProcedureEvidenceSequence"]
                (ref_series,) = study["ReferencedSeriesSequence"]
                (image,) = ref_series["ReferencedSOPSequence"]
            else:
                (image,) = tags["SourceImageSequence"]
            found[kind][image["ReferencedSOPInstanceUID"]] += 1
    return found


def _verdict(url: str, orthanc: Orthanc, acknowledged: set[str]) -> dict[str, Any]:
    archive = outputs_per_source(orthanc)
    lost = sorted(uid for uid in acknowledged if archive["sr"][uid] != 1 or archive["sc"][uid] != 1)
    twice_in_archive = sorted(
        uid for kind in ("sr", "sc") for uid, count in archive[kind].items() if count > 1
    )
    sent_events = Counter(
        details["send_id"]
        for (details,) in rows(url, "SELECT details FROM audit_events WHERE kind = 'send.sent'")
    )
    sent_twice = sorted(send for send, count in sent_events.items() if count > 1)
    sent_rows = rows(
        url,
        "SELECT destination, sop_instance_uid, count(*) FROM sends WHERE state = 'sent' "
        "GROUP BY destination, sop_instance_uid HAVING count(*) > 1",
    )
    claimed_again = rows(url, "SELECT count(*) FROM sends WHERE attempts > 1")[0][0]
    results = rows(url, "SELECT instance_id, count(*) FROM results GROUP BY instance_id")
    claims = rows(
        url, "SELECT job_id, count(*) FROM audit_events WHERE kind = 'job.running' GROUP BY job_id"
    )
    recovered = rows(url, "SELECT count(*) FROM audit_events WHERE kind = 'send.recovered'")
    return {
        "lost": len(lost),
        "lost_uids": lost[:20],
        "duplicated": len(twice_in_archive) + len(sent_twice) + len(sent_rows),
        "duplicated_in_archive": twice_in_archive[:20],
        "send_ids_sent_twice": sent_twice[:20],
        "sent_rows_twice": len(sent_rows),
        "resent": int(claimed_again),
        "results_per_instance_max": max((count for _, count in results), default=0),
        "jobs_rerun": sum(1 for _, count in claims if count > 1),  # a killed worker's batch
        "sends_recovered": int(recovered[0][0]),  # claims of a killed sender, freed at once
        "archive_sr": sum(archive["sr"].values()),
        "archive_sc": sum(archive["sc"].values()),
        "unacknowledged_but_stored": len(
            {uid for (uid,) in rows(url, "SELECT sop_instance_uid FROM instances")} - acknowledged
        ),
    }
