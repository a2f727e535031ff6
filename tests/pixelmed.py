"""Run David Clunie's PixelMed ``DicomSRValidator`` on the SRs the node writes.

Where ``dciodvfy`` checks the IOD (attributes, types, conditions), PixelMed also checks
the content tree against the templates (PS3.16): with ``-checktemplateid`` it validates
the tree as the root template its Content Template Sequence names (TID 1500 for ours),
with ``-checkcontentitemorder`` the order of the items, and it reports every content
item that no row of the template accounts for ("Content Item not in template") and every
code missing from a context group the template names. A line starting with ``Error`` is
a violation, one starting with ``Warning`` a remark; the tests require neither.

The validator is the Debian package ``pixelmed-apps`` (``libpixelmed-java``), a Java
program whose template rules are XSLT: the JDK's default XPath limits are far too small
for them, so they are lifted (``-Djdk.xml.xpath…Limit=0``), as PixelMed's own scripts do.
It always exits with 0, so completion is read from its output. One file per run, several
seconds each (JVM start and the stylesheet compilation): tests validate few files.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

PIXELMED_JAR = Path(os.environ.get("PIXELMED_JAR", "/usr/share/java/pixelmed.jar"))
VALIDATOR = "com.pixelmed.validate.DicomSRValidator"
XPATH_LIMITS = (
    "-Djdk.xml.xpathExprOpLimit=0",
    "-Djdk.xml.xpathExprGrpLimit=0",
    "-Djdk.xml.xpathTotalOpLimit=0",
)
OPTIONS = ("-checktemplateid", "-checkcontentitemorder")
TIMEOUT_S = 180
COMPLETE = "IOD validation complete"


@dataclass(frozen=True)
class PixelmedReport:
    """What PixelMed's SR validator said about one file."""

    iod: str  # e.g. "Comprehensive3DSR"
    root_template: str  # e.g. "TID_1500"
    errors: list[str]
    warnings: list[str]
    output: str


def validate_sr(path: Path) -> PixelmedReport:
    """Run the validator on ``path``; a missing Java or jar fails the test, not skips it."""
    java = shutil.which("java")
    if java is None or not PIXELMED_JAR.is_file():
        pytest.fail(f"PixelMed not installed ({PIXELMED_JAR}; Debian package pixelmed-apps)")
    proc = subprocess.run(
        [java, *XPATH_LIMITS, "-cp", str(PIXELMED_JAR), VALIDATOR, *OPTIONS, str(path)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    output = proc.stdout + proc.stderr
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    if COMPLETE not in lines:  # e.g. an XPath limit hit, or a file it could not read
        pytest.fail(f"PixelMed did not complete the validation of {path}:\n{output}")
    return PixelmedReport(
        iod=_found(lines, "Found ", " IOD"),
        root_template=_found(lines, "Found Root Template ", " ").strip(),
        errors=[line for line in lines if line.startswith("Error")],
        warnings=[line for line in lines if line.startswith("Warning")],
        output=output,
    )


def _found(lines: list[str], prefix: str, suffix: str) -> str:
    for line in lines:
        if line.startswith(prefix) and suffix in line[len(prefix) :]:
            rest = line[len(prefix) :]
            return rest[: rest.index(suffix)]
    return ""


def assert_valid_sr(
    ds: Dataset, directory: Path, name: str = "sr.dcm", root_template: str = "TID_1500"
) -> PixelmedReport:
    """Save ``ds`` and require the template it names, zero errors and zero warnings."""
    path = directory / name
    ds.save_as(path, enforce_file_format=True)
    report = validate_sr(path)
    assert report.root_template == root_template, report.output
    assert report.errors == [], report.output
    assert report.warnings == [], report.output
    return report
