"""Structured logs: what an operator's log shipper receives."""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Iterator

import pytest

from dicom_node.config import LoggingSettings
from dicom_node.logs import configure_logging


@pytest.fixture
def stream(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """The node's logging on a string, undone afterwards for the tests that follow."""
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)
    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    buffer = io.StringIO()
    configure_logging(LoggingSettings(to_file=False), stream=buffer)
    yield buffer
    root.handlers[:] = before
    root.setLevel(level)


def test_a_crashing_thread_is_one_json_line_not_a_raw_traceback(stream: io.StringIO) -> None:
    def crash() -> None:
        raise RuntimeError("Evt7 in Sta13")

    thread = threading.Thread(target=crash, name="association-7")
    thread.start()
    thread.join()

    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["event"] == "thread crashed"
    assert record["thread"] == "association-7"
    assert record["error_type"] == "RuntimeError"
