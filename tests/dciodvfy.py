"""Run David Clunie's ``dciodvfy`` (dicom3tools) on objects the node writes.

``dciodvfy`` checks a file against its IOD (PS3.3): missing or empty attributes by Type,
conditions, enumerated values, VR syntax. It prints to stderr; a line starting with
``Error`` is a violation, one starting with ``Warning`` a remark. The tests require zero
errors and only the warnings listed in :data:`EXPECTED_WARNINGS`, each with its reason,
so a new warning is looked at rather than waved through.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

DCIODVFY = "dciodvfy"

EXPECTED_WARNINGS: dict[str, str] = {
    # Our private scheme is declared in the Coding Scheme Identification Sequence, but
    # dciodvfy only knows the standard's designators.
    r"Unrecognized defined term <99CXRAI> .*<Coding Scheme Designator>": "private codes",
    # Study Date/Time/ID are Type 2: empty is conformant when the source does not know them.
    r"needed to build DICOMDIR - Study (Date|Time|ID)$": "source lacks Type 2 study attributes",
    # Names are copied verbatim from the source; we do not rewrite a patient's name.
    r"Value dubious for this VR - .* PN .* Retired Person Name form": "source's name format",
    # The algorithm's Contributing Equipment item carries its Device UID (IHE AI Results);
    # the Debian dicom3tools release does not list it in that sequence.
    r"Attribute is not present in standard DICOM IOD - \(0x0018,0x1002\) UI Device UID": (
        "algorithm Device UID"
    ),
    r"Dicom dataset contains attributes not present in standard DICOM IOD - this is a "
    r"Standard Extended SOP Class": "algorithm Device UID",
}


@dataclass(frozen=True)
class DciodvfyReport:
    """What ``dciodvfy`` said about one file."""

    iod: str  # the IOD dciodvfy recognised, e.g. "Comprehensive3DSR" or "SCImage"
    errors: list[str]
    warnings: list[str]
    returncode: int
    output: str

    @property
    def unexpected_warnings(self) -> list[str]:
        return [w for w in self.warnings if not any(re.search(p, w) for p in EXPECTED_WARNINGS)]


def dciodvfy(path: Path) -> DciodvfyReport:
    """Run ``dciodvfy`` on ``path``; a missing tool fails the test instead of skipping it."""
    if shutil.which(DCIODVFY) is None:
        pytest.fail("dciodvfy not installed (Debian package dicom3tools)")
    proc = subprocess.run(
        [DCIODVFY, str(path)], capture_output=True, text=True, timeout=120, check=False
    )
    output = proc.stderr + proc.stdout
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    plain = [line for line in lines if not line.startswith(("Error", "Warning"))]
    return DciodvfyReport(
        iod=plain[0] if plain else "",
        errors=[line for line in lines if line.startswith("Error")],
        warnings=[line for line in lines if line.startswith("Warning")],
        returncode=proc.returncode,
        output=output,
    )


def verify(ds: Dataset, directory: Path, name: str = "object.dcm") -> DciodvfyReport:
    """Save ``ds`` as a PS3.10 file in ``directory`` and run ``dciodvfy`` on it."""
    path = directory / name
    ds.save_as(path, enforce_file_format=True)
    return dciodvfy(path)


def assert_conformant(
    ds: Dataset, directory: Path, iod: str, name: str = "object.dcm"
) -> DciodvfyReport:
    """Checked as ``iod``, zero errors, no warning outside :data:`EXPECTED_WARNINGS`."""
    report = verify(ds, directory, name)
    assert report.iod == iod, report.output
    assert report.errors == [], report.output
    assert report.returncode == 0, report.output
    assert report.unexpected_warnings == [], report.output
    return report
