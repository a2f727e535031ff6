"""End-to-end fixtures: a reference dcmtk receiver that records what travels on the wire."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import DCMTK_STORESCP, START_TIMEOUT_S, dataset_bytes, free_port, storescu


def _wait_for_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("dcmtk storescp exited")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError("dcmtk storescp did not start")


@pytest.fixture(scope="session")
def wire_datasets(
    image_files: list[Path], rg1_uncr: Path, dcmtk: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[Path, bytes]]:
    """What dcmtk storescu actually puts on the wire for each file.

    storescu may normalise a data set while sending it (it pads odd-length values and
    drops group lengths, for instance), so "stored byte-identical to what was sent" is
    checked against a bit-preserving dcmtk storescp (``+B``) fed with the same command.
    """
    out = tmp_path_factory.mktemp("wire")
    port = free_port()
    proc = subprocess.Popen(
        [str(DCMTK_STORESCP), "+B", "+xa", "-od", str(out), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_port(port, proc)
        captured: dict[Path, bytes] = {}
        for path in [*image_files, rg1_uncr]:
            result = storescu(port, path, called_ae="STORESCP")
            assert result.returncode == 0, result.stdout + result.stderr
            (received,) = list(out.iterdir())
            captured[path] = dataset_bytes(received)
            received.unlink()
        yield captured
    finally:
        proc.terminate()
        proc.wait(timeout=30)
