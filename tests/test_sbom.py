"""The software bill of materials: the README's command writes a CycloneDX JSON SBOM.

The command is taken from the README (Security) so the documentation cannot drift from
what is tested. The SBOM must be CycloneDX JSON naming this project as its subject, and
list the installed packages — the node's own dependencies among them — each with its
version and a ``pkg:pypi`` package URL.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path
from urllib.parse import unquote

from tests.support import run

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
SBOM_COMMAND = re.compile(r"^(\.venv/bin/cyclonedx-py environment .*)$", re.MULTILINE)
RUNTIME = ("torch", "pydicom", "pynetdicom", "fastapi", "sqlalchemy", "highdicom", "monai")


def documented_command() -> list[str]:
    found = SBOM_COMMAND.findall(README.read_text(encoding="utf-8"))
    assert len(found) == 1, "the README documents one SBOM command"
    return shlex.split(found[0].split("#")[0])


def test_the_documented_command_writes_a_cyclonedx_sbom_with_the_components(
    tmp_path: Path,
) -> None:
    command = documented_command()
    out = command.index("-o") + 1
    command[out] = str(tmp_path / "sbom.cdx.json")
    venv = Path(sys.prefix)
    command[0] = str(venv / "bin" / "cyclonedx-py")
    command[-1] = str(venv)  # the environment these tests run in
    command[command.index("--pyproject") + 1] = str(REPO / "pyproject.toml")
    result = run(command, cwd=REPO)
    assert result.returncode == 0, result.stderr

    sbom = json.loads((tmp_path / "sbom.cdx.json").read_text())
    assert sbom["bomFormat"] == "CycloneDX" and sbom["specVersion"].startswith("1.")
    assert sbom["metadata"]["component"]["name"] == "cxr-ai-node"
    components = {c["name"].lower(): c for c in sbom["components"]}
    assert len(components) >= 50
    for name in RUNTIME:
        component = components[name]
        assert component["version"], name
        purl = unquote(component["purl"])  # a local version's "+" is percent-encoded
        assert purl == f"pkg:pypi/{name}@{component['version']}", component
    assert all(c.get("purl", "").startswith("pkg:pypi/") for c in components.values())
    assert sbom["dependencies"], "the dependency graph is part of the SBOM"
