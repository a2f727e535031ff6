"""Structured logging: one JSON object (or one ``key=value`` line) per event.

Rules that matter in a hospital:

* logs identify objects by UID, AE title, peer address and content hash — **never** by
  patient name, ID or birth date. Fields with such names are replaced by ``[redacted]``
  as a safety net, and third-party loggers that could echo dataset values (pynetdicom's
  identifier dumps, pydicom's value warnings) are silenced at the source;
* third-party libraries that log routine work at INFO (:data:`CHATTY_LIBRARIES`:
  highdicom's per-module copy lines, pynetdicom's per-association lines) are kept at
  WARNING unless the node logs at DEBUG;
* logs go to stderr (so ``status --json`` keeps stdout for its one JSON document) and,
  by default, to a rotated ``<home>/logs/node.log``.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import sys
import threading
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from dicom_node.config import LoggingSettings

PHI_FIELDS = frozenset(
    {
        "patient_name",
        "patientname",
        "patient_id",
        "patientid",
        "patient_birth_date",
        "patientbirthdate",
        "other_patient_ids",
        "other_patient_names",
        "patient_address",
        "patient_mother_birth_name",
        "patient_telephone_numbers",
        "accession_number",
    }
)
REDACTED = "[redacted]"
_HANDLER_MARK = "_dicom_node_handler"
LOG_FILE_MAX_BYTES = 10 * 1024 * 1024
LOG_FILE_BACKUPS = 5


def _redact(fields: dict[str, Any]) -> dict[str, Any]:
    return {key: REDACTED if key.lower() in PHI_FIELDS else value for key, value in fields.items()}


def _timestamp(record: logging.LogRecord) -> str:
    moment = datetime.fromtimestamp(record.created, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _document(record: logging.LogRecord) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "ts": _timestamp(record),
        "level": record.levelname.lower(),
        "logger": record.name,
        "event": record.getMessage(),
    }
    doc.update(_redact(getattr(record, "fields", None) or {}))
    if record.exc_info and record.exc_info[1] is not None:
        error = record.exc_info[1]
        doc["error_type"] = type(error).__name__
        doc["error"] = str(error)[:500]
        frames = traceback.extract_tb(record.exc_info[2])
        doc["stack"] = [f"{Path(f.filename).name}:{f.lineno}:{f.name}" for f in frames][-8:]
    return doc


class JsonFormatter(logging.Formatter):
    """JSON lines; exception messages and a compact stack, no source text or locals."""

    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(_document(record), default=str, ensure_ascii=False)


class KeyValueFormatter(logging.Formatter):
    """``ts level logger event key=value …`` for humans tailing a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        doc = _document(record)
        head = f"{doc.pop('ts')} {doc.pop('level'):7} {doc.pop('logger')}: {doc.pop('event')}"
        tail = " ".join(f"{key}={_kv(value)}" for key, value in doc.items())
        return f"{head} {tail}".rstrip()


def _kv(value: object) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return json.dumps(text) if (" " in text or not text) else text


class StructLogger:
    """Thin wrapper: ``log.info("instance stored", sop_instance_uid=…, size=…)``."""

    def __init__(self, name: str) -> None:
        self._logger = logging.getLogger(name)

    def _log(self, level: int, event: str, fields: dict[str, Any], exc_info: bool = False) -> None:
        if self._logger.isEnabledFor(level):
            self._logger.log(
                level, event, extra={"fields": fields}, exc_info=exc_info, stacklevel=3
            )

    def debug(self, event: str, **fields: Any) -> None:
        self._log(logging.DEBUG, event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log(logging.INFO, event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log(logging.WARNING, event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._log(logging.ERROR, event, fields)

    def exception(self, event: str, **fields: Any) -> None:
        """Log at ERROR with the current exception's type, message and stack."""
        self._log(logging.ERROR, event, fields, exc_info=True)


def get_logger(name: str) -> StructLogger:
    return StructLogger(name)


def configure_logging(
    settings: LoggingSettings, log_dir: Path | None = None, stream: IO[str] | None = None
) -> None:
    """Install our handlers on the root logger (idempotent) and tame chatty libraries."""
    formatter: logging.Formatter = (
        JsonFormatter() if settings.format == "json" else KeyValueFormatter()
    )
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(handler)
        handler.close()
    handlers: list[logging.Handler] = [logging.StreamHandler(stream or sys.stderr)]
    if settings.to_file and log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(
            logging.handlers.RotatingFileHandler(
                log_dir / "node.log",
                maxBytes=LOG_FILE_MAX_BYTES,
                backupCount=LOG_FILE_BACKUPS,
                encoding="utf-8",
            )
        )
    for handler in handlers:
        handler.setFormatter(formatter)
        setattr(handler, _HANDLER_MARK, True)
        root.addHandler(handler)
    root.setLevel(settings.level)
    _quiet_libraries(settings.level)
    threading.excepthook = _log_thread_crash


def _log_thread_crash(args: threading.ExceptHookArgs) -> None:
    """A thread that dies (pynetdicom's per-connection threads can, on odd peers) is logged
    as one structured line like everything else, not as a raw traceback on stderr."""
    if args.exc_type is SystemExit:
        return
    thread = args.thread.name if args.thread is not None else None
    logging.getLogger("dicom_node.threads").error(
        "thread crashed", exc_info=args.exc_value or True, extra={"fields": {"thread": thread}}
    )


# Third-party loggers that speak at INFO about routine work, and how much of it: kept at
# WARNING unless the node logs at DEBUG, so that the node's own events stay readable.
CHATTY_LIBRARIES: dict[str, str] = {
    # one line per association event (requested, accepted, released) and per C-STORE
    "pynetdicom": "per-association and per-message lines",
    # "copy attributes of module …": about twenty lines per SR or SC written, thousands per
    # hundred images
    "highdicom": "a line per DICOM module copied into each output",
}


def library_log_level(level: str) -> int:
    """Level of the :data:`CHATTY_LIBRARIES` loggers when the node logs at ``level``: their
    INFO lines only when the node's own DEBUG ones are wanted too, WARNING otherwise."""
    return logging.INFO if level == "DEBUG" else logging.WARNING


def _quiet_libraries(level: str) -> None:
    """Keep chatty libraries at WARNING (:func:`library_log_level`); pynetdicom and pydicom
    can also print dataset values (names, IDs): their identifier dumps are off and pydicom's
    value warnings are kept out at any level."""
    from pynetdicom import _config as pynetdicom_config

    pynetdicom_config.LOG_REQUEST_IDENTIFIERS = False
    pynetdicom_config.LOG_RESPONSE_IDENTIFIERS = False
    for name in CHATTY_LIBRARIES:
        logging.getLogger(name).setLevel(library_log_level(level))
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    logging.getLogger("alembic").setLevel(logging.WARNING)
