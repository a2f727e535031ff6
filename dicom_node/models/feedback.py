"""Readers' labels in: validated the same way from the API and from a CSV file.

A label names a case — a study (``study_instance_uid``) or one image
(``sop_instance_uid``) — a finding by its code, whether the reader found it, the reader
and the source. A CSV import is all or nothing: one malformed row rejects the file with
every error listed by line, so a half-imported file never skews the live figures.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping

from pydicom.uid import UID

from storage.registry import Label

TRUE = {"1", "true", "yes", "y", "present"}
FALSE = {"0", "false", "no", "n", "absent"}
REQUIRED = ("finding_code", "present", "reader")


class FeedbackError(ValueError):
    """A label (or a whole file) that cannot be taken, with every reason."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors


def label_of(values: Mapping[str, object], source: str) -> Label:
    """One label from a mapping of its fields (API body or CSV row)."""
    errors = []

    def text(key: str) -> str:
        value = values.get(key)
        return "" if value is None else str(value).strip()

    study, sop = text("study_instance_uid"), text("sop_instance_uid")
    if not study and not sop:
        errors.append("study_instance_uid or sop_instance_uid is required")
    for key, uid in (("study_instance_uid", study), ("sop_instance_uid", sop)):
        if uid and not UID(uid).is_valid:
            errors.append(f"{key} {uid[:70]!r} is not a valid UID")
    code = text("finding_code")
    if not code or len(code) > 64:
        errors.append("finding_code is required (at most 64 characters)")
    present = values.get("present")
    flag = str(present).strip().lower() if present is not None else ""
    if isinstance(present, bool):
        flag = "1" if present else "0"
    if flag not in TRUE | FALSE:
        errors.append(f"present must be 1 or 0, not {str(present)[:20]!r}")
    reader = text("reader")
    if not reader or len(reader) > 64:
        errors.append("reader is required (at most 64 characters)")
    source = text("source") or source
    if errors:
        raise FeedbackError(errors)
    return Label(
        finding_code=code,
        present=flag in TRUE,
        reader=reader,
        source=source[:32],
        study_instance_uid=study or None,
        sop_instance_uid=sop or None,
    )


def parse_csv(text: str, source: str = "csv") -> list[Label]:
    """Every row of a CSV export, or :class:`FeedbackError` naming each bad line."""
    reader = csv.DictReader(io.StringIO(text))
    columns = set(reader.fieldnames or ())
    missing = [c for c in REQUIRED if c not in columns]
    if not columns & {"study_instance_uid", "sop_instance_uid"}:
        missing.append("study_instance_uid or sop_instance_uid")
    if missing:
        raise FeedbackError([f"missing column(s): {', '.join(missing)}"])
    labels, errors = [], []
    for line, row in enumerate(reader, start=2):
        try:
            labels.append(label_of(row, source))
        except FeedbackError as exc:
            errors += [f"line {line}: {error}" for error in exc.errors]
    if errors:
        raise FeedbackError(errors)
    if not labels:
        raise FeedbackError(["the file has no rows"])
    return labels


def summary(labels: Iterable[Label]) -> dict[str, int]:
    labels = list(labels)
    return {
        "labels": len(labels),
        "present": sum(label.present for label in labels),
        "absent": sum(not label.present for label in labels),
    }
