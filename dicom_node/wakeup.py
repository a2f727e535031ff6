"""Waking a polling loop the moment there is work, without losing a wake-up.

The worker waits for jobs and the sender for sends. Within one ``serve`` process the
producer (the listener, resp. a worker) calls :meth:`Wakeup.notify` right after its
transaction commits, so an image is analysed and its results sent without waiting for
the next poll; across processes (several ``serve`` on one database) the poll interval
remains the fallback. A notification that arrives while the consumer is busy is kept
(a counter, not an edge), so the consumer looks at the queue once more before sleeping.
"""

from __future__ import annotations

import threading


class Wakeup:
    """A level-triggered wake-up shared by one producer side and many consumers."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._generation = 0

    def notify(self) -> None:
        """There is new work: wake every waiting consumer (and the next one to wait)."""
        with self._condition:
            self._generation += 1
            self._condition.notify_all()

    def mark(self) -> int:
        """The current generation; take it *before* looking at the queue."""
        with self._condition:
            return self._generation

    def wait(self, seen: int, timeout: float) -> bool:
        """Sleep until a notification newer than ``seen`` or ``timeout``; True if notified."""
        with self._condition:
            return self._condition.wait_for(lambda: self._generation != seen, timeout)

    def interrupt(self) -> None:
        """Wake everyone (used at shutdown so that loops see their stop flag at once)."""
        self.notify()
