"""Is each destination reachable? Every type's ``check()`` (C-ECHO for DICOM), concurrently.

Why concurrently and with a short timeout: ``status`` asks this of every destination on
every call, and a monitoring probe must get its answer in well under a second even when
a PACS is down — one dead destination must not cost the others' time, let alone its own
30 s association timeout. The checks run in threads with every timeout of the
destination lowered to ``timeout_s``; whatever has not answered by the deadline is
reported as ``timeout``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass

from dicom_node.dispatch.base import DestinationBase, SendOutcome, get_sender

DEFAULT_TIMEOUT_S = 2.0
MAX_THREADS = 16


@dataclass(frozen=True)
class Reachability:
    """The outcome of one check, JSON-ready through :meth:`as_dict`."""

    name: str
    type: str
    peer: str
    reachable: bool
    category: str
    message: str
    latency_ms: float | None

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def check_destinations(
    destinations: Sequence[DestinationBase],
    our_ae_title: str,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> list[Reachability]:
    """Check every destination at once; results in the order given."""
    if not destinations:
        return []
    pool = ThreadPoolExecutor(min(len(destinations), MAX_THREADS), thread_name_prefix="check")
    try:
        futures = [pool.submit(_timed_check, d, our_ae_title, timeout_s) for d in destinations]
        # connect, associate and echo each get timeout_s; a little slack for the threads
        wait(futures, timeout=3 * timeout_s + 1.0)
        return [_outcome(d, f, timeout_s) for d, f in zip(destinations, futures, strict=True)]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def _timed_check(
    destination: DestinationBase, our_ae_title: str, timeout_s: float
) -> tuple[SendOutcome, float]:
    short = destination.capped(timeout_s)
    started = time.perf_counter()
    try:
        result = get_sender(destination.type).check(short, our_ae_title)
    except Exception as exc:  # a type's check() should not raise; report it if it does
        result = SendOutcome(False, None, True, f"check failed: {exc}", "connection")
    return result, (time.perf_counter() - started) * 1000.0


def _outcome(
    destination: DestinationBase, future: Future[tuple[SendOutcome, float]], timeout_s: float
) -> Reachability:
    peer = destination.peer
    if not future.done():
        return Reachability(
            destination.name,
            destination.type,
            peer,
            False,
            "timeout",
            f"no answer within {timeout_s:g} s",
            None,
        )
    result, latency_ms = future.result()
    return Reachability(
        destination.name,
        destination.type,
        peer,
        result.success,
        result.category,
        result.message,
        round(latency_ms, 1),
    )
