"""Who owns a claim: ``host:pid:name`` identities and a liveness probe for them.

Jobs and sends record which process claimed them. A node restarting on the same host
can then tell claims of a process that died (``kill -9``, power loss) from those of
another node that is still running, and take the former back at once instead of waiting
for their lease to expire.
"""

from __future__ import annotations

import os
import socket


def owner_id(name: str) -> str:
    """``host:pid:name`` of the calling process."""
    return f"{socket.gethostname()}:{os.getpid()}:{name}"


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host (signal 0 probes, sends nothing).

    Our own pid counts as alive: claims made by this very process are never orphans.
    """
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
