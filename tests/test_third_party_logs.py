"""Third-party chatter stays out of the node's log at INFO.

highdicom logs every DICOM module it copies into an output at INFO ("copy attributes of
module …", about twenty lines per SR or SC: thousands per hundred images), pynetdicom a
line per association event. At the node's default INFO level they are kept at WARNING;
at DEBUG they come back, for whoever is chasing a problem.
"""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.config import LoggingSettings
from dicom_node.logs import CHATTY_LIBRARIES, configure_logging, library_log_level
from storage.spool import Spool
from tests.pipeline_support import Node, chest_image

Configure = Callable[[str], io.StringIO]


@pytest.fixture
def configure(monkeypatch: pytest.MonkeyPatch) -> Iterator[Configure]:
    """Install the node's logging at a level on a string; undone afterwards."""
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    libraries = {name: logging.getLogger(name).level for name in [*CHATTY_LIBRARIES, "pydicom"]}

    def install(node_level: str) -> io.StringIO:
        buffer = io.StringIO()
        configure_logging(LoggingSettings(level=node_level, to_file=False), stream=buffer)
        return buffer

    yield install
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, library_level in libraries.items():
        logging.getLogger(name).setLevel(library_level)


def records(buffer: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


def build_outputs(data_dir: Path) -> None:
    """The SR and the heatmap SC of one chest image, by the node's builders."""
    from dicom_node.results.heatmap_sc import heatmap_secondary_capture
    from dicom_node.results.sr import measurement_report
    from tests.results_data import make_result, read_source

    source = read_source("siim-cr-jpegbaseline.dcm")
    result = make_result(source)
    measurement_report(source, result)
    heatmap_secondary_capture(source, result)


@pytest.mark.parametrize("level", ["DEBUG", "INFO", "WARNING", "ERROR"])
def test_chatty_libraries_are_at_warning_unless_the_node_logs_at_debug(
    configure: Configure, level: str
) -> None:
    configure(level)
    expected = logging.INFO if level == "DEBUG" else logging.WARNING
    assert library_log_level(level) == expected
    for name in ("highdicom", "pynetdicom"):
        assert logging.getLogger(name).level == expected, name
    assert logging.getLogger("pydicom").level == logging.ERROR


def test_a_pipeline_run_at_info_logs_no_highdicom_lines(
    configure: Configure,
    data_dir: Path,
    tmp_path: Path,
    database_url: str,
    sessions: sessionmaker[Session],
    spool: Spool,
) -> None:
    buffer = configure("INFO")
    node = Node(tmp_path, database_url, sessions, spool, toml="")
    image = chest_image(data_dir / "dicom", tmp_path, accession="A-LOG-1")
    node.analyse(image.path)

    logged = records(buffer)
    assert node.engine.batches == [1]  # the image was analysed: an SR and an SC were built
    assert any(r["logger"].startswith("dicom_node") for r in logged)  # the node still speaks
    chatter = [r for r in logged if r["logger"].split(".")[0] in CHATTY_LIBRARIES]
    assert chatter == []
    assert "copy attributes of module" not in buffer.getvalue()


def test_at_debug_highdicom_speaks_again(configure: Configure, data_dir: Path) -> None:
    """The control: the same builders do log, and a DEBUG node shows it."""
    buffer = configure("DEBUG")
    build_outputs(data_dir)
    lines = [r for r in records(buffer) if r["logger"].startswith("highdicom")]
    assert any("copy attributes of module" in r["event"] for r in lines)

    buffer = configure("INFO")
    build_outputs(data_dir)
    assert not [r for r in records(buffer) if r["logger"].startswith("highdicom")]
