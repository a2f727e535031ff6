"""The sender: drains the outbox into the destinations, one association per batch.

Loop: claim the due sends (:func:`storage.outbox.claim_due`, a lease), group them by
destination, hand each group to the destination's target type
(:func:`dicom_node.dispatch.get_sender` — for ``type = "dicom"`` one C-STORE association
with the contexts the objects need, PS3.8 §7.1.1.13), then record every outcome in one
transaction: sent, retry later with backoff and jitter, or dead-lettered.

Within one ``serve`` process a worker wakes the sender right after it committed new sends
(:class:`~dicom_node.wakeup.Wakeup`), so results leave the node immediately; otherwise it
polls every ``poll_interval`` seconds. A destination that is down costs little: its sends
are simply not due until their backoff expires, and the other destinations' are sent.
"""

from __future__ import annotations

import socket
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import Settings
from dicom_node.dispatch import Destination, SendOutcome, get_sender
from dicom_node.logs import get_logger
from dicom_node.processes import owner_id, process_alive
from dicom_node.wakeup import Wakeup
from storage import outbox
from storage.db import session_scope
from storage.models import Send, SendState
from storage.spool import Spool

log = get_logger(__name__)
STOP_TIMEOUT_S = 120.0
ORPHAN_CHECKS_PER_LEASE = 4  # with several processes, a dead sender's claims return soon


@dataclass(frozen=True)
class Claimed:
    """A claimed send, detached from its session."""

    send_id: int
    destination: str
    sop_instance_uid: str
    file_path: str
    attempts: int


class Sender:
    """The outbox loop of one node process (a :class:`~dicom_node.node.Service`)."""

    name = "sender"

    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        spool: Spool,
        *,
        wakeup: Wakeup,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.spool = spool
        self.wakeup = wakeup
        self.sender_id = owner_id("sender")
        sender = settings.sender
        self.policy = outbox.BackoffPolicy(sender.backoff_base, sender.backoff_cap, sender.max_age)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sender", daemon=True)

    def start(self) -> None:
        self._recover_orphans()
        self._thread.start()
        log.info("sender started", destinations=[d.name for d in self.settings.destinations])

    def stop(self) -> None:
        self._stop.set()
        self.wakeup.interrupt()
        if self._thread.is_alive():
            self._thread.join(timeout=STOP_TIMEOUT_S)
        log.info("sender stopped")

    def _recover_orphans(self) -> None:
        """Sends claimed by dead processes on this host are due now, not after the lease."""
        with session_scope(self.sessions) as session:
            recovered = outbox.recover_orphans(
                session, socket.gethostname(), process_alive, actor=self.sender_id
            )
        if recovered:
            log.warning("re-queued sends of a sender that died", sends=recovered)

    def _run(self) -> None:
        poll = self.settings.sender.poll_interval
        orphan_check = self.settings.sender.lease / ORPHAN_CHECKS_PER_LEASE
        checked = time.monotonic()
        while not self._stop.is_set():
            seen = self.wakeup.mark()
            try:
                if time.monotonic() - checked >= orphan_check:
                    checked = time.monotonic()
                    self._recover_orphans()  # another node process on this host may have died
                claimed = self.run_once()
            except SQLAlchemyError as exc:
                log.warning("outbox unavailable", error=str(exc)[:200])
                self._stop.wait(poll)
                continue
            except Exception:  # a bug must not silently end delivery for good
                log.exception("sender loop failed; continuing")
                self._stop.wait(poll)
                continue
            if not claimed:
                self.wakeup.wait(seen, poll)

    def run_once(self) -> int:
        """Claim and deliver one batch of due sends; returns how many were claimed."""
        claimed = self._claim()
        groups: dict[str, list[Claimed]] = defaultdict(list)
        for item in claimed:
            groups[item.destination].append(item)
        for name, items in groups.items():
            self._deliver(name, items)
        return len(claimed)

    def _claim(self) -> list[Claimed]:
        lease = timedelta(seconds=self.settings.sender.lease)
        with session_scope(self.sessions) as session:
            sends = outbox.claim_due(
                session, self.sender_id, limit=self.settings.sender.batch_size, lease=lease
            )
            return [
                Claimed(s.id, s.destination, s.sop_instance_uid, s.file_path, s.attempts)
                for s in sends
            ]

    def _deliver(self, name: str, items: list[Claimed]) -> None:
        destination = self.settings.destination(name)
        if destination is None:
            reason = f"destination {name!r} is not configured (any more)"
            self._record(items, [_unconfigured(reason, i) for i in items])
            return
        started = time.perf_counter()
        results = self._send(destination, items)
        self._record(items, results)
        log.info(
            "sends attempted",
            destination=name,
            sent=sum(r.success for r in results),
            failed=sum(not r.success for r in results),
            elapsed_ms=round((time.perf_counter() - started) * 1000, 1),
        )

    def _send(self, destination: Destination, items: list[Claimed]) -> list[SendOutcome]:
        paths = [self.spool.path_of(item.file_path) for item in items]
        try:
            target = get_sender(destination.type)
            return target.send(destination, paths, self.settings.node.ae_title)
        except Exception as exc:  # a target-type bug must not kill the loop
            log.exception("destination sender crashed", destination=destination.name)
            failure = f"sender error: {type(exc).__name__}"
            return [_unconfigured(failure, item, retryable=True) for item in items]

    def _record(self, items: Sequence[Claimed], results: Sequence[SendOutcome]) -> None:
        """Every outcome of the batch in one transaction."""
        with session_scope(self.sessions) as session:
            for item, result in zip(items, results, strict=True):
                send = session.get(Send, item.send_id, with_for_update=True)
                if send is None or send.state is not SendState.SENDING:
                    continue
                if send.sender != self.sender_id:
                    continue  # our lease expired and another sender took it over
                self._record_one(session, send, result)

    def _record_one(self, session: Session, send: Send, result: SendOutcome) -> None:
        if result.success:
            note = result.message if result.warning else None
            outbox.mark_sent(session, send, actor=self.sender_id, note=note)
            return
        state = outbox.record_failure(
            session,
            send,
            result.message,
            retryable=result.retryable,
            policy=self.policy,
            actor=self.sender_id,
        )
        if state is SendState.DEAD:
            log.error(
                "send dead-lettered",
                send_id=send.id,
                destination=send.destination,
                sop_instance_uid=send.sop_instance_uid,
                attempts=send.attempts,
                category=result.category,
                error=result.message[:300],
            )


def _unconfigured(message: str, item: Claimed, *, retryable: bool = False) -> SendOutcome:
    return SendOutcome(
        success=False,
        status=None,
        retryable=retryable,
        message=message,
        category="invalid_input",
        sop_instance_uid=item.sop_instance_uid,
    )
