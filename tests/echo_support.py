"""A real C-ECHO peer for tests: dcmtk's ``storescp`` on a free port."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from tests.support import DCMTK_STORESCP, free_port

START_TIMEOUT_S = 30.0


@contextlib.contextmanager
def storescp(directory: Path, aet: str = "PACS") -> Iterator[int]:
    """Run ``storescp`` (which answers C-ECHO and stores into ``directory``); yields its port."""
    port = free_port()
    directory.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [str(DCMTK_STORESCP), "-aet", aet, "-od", str(directory), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_listening(port, proc)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _wait_listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"storescp exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"storescp did not listen on {port} within {START_TIMEOUT_S:g} s")
