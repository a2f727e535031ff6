"""``docs/conformance-statement.md`` says what the code does.

The conformance statement's tables are compared with the code's own tables: the
listener's SOP classes and transfer syntaxes (``dicom_node.contexts``), the output types
of ``dicom_node.results.registry`` and their SOP classes, the transfer syntaxes the sender
proposes, the C-STORE statuses the node sends and how it treats those it receives, the
listener's configuration defaults, the implementation identifiers, and every code the
result writers define — the private ``99CXRAI`` ones with their meanings. A change to any
of them fails here until the document is updated: an output type added to the registry
needs its row in Table 8.1-1, a code its row in Table 8.3-1 or 8.3-2.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
import tomllib
from functools import cache
from typing import Any

from pydicom.uid import UID

from dicom_node.config import NodeSettings
from dicom_node.contexts import (
    STORAGE_SOP_CLASSES,
    STORAGE_TRANSFER_SYNTAXES,
    VERIFICATION_SOP_CLASS,
    VERIFICATION_SYNTAXES,
)
from dicom_node.receive import StoreStatus
from tests.support import REPO_ROOT

DOCUMENT = REPO_ROOT / "docs" / "conformance-statement.md"
PRIVATE_SCHEME = "99CXRAI"


@cache
def document() -> str:
    return DOCUMENT.read_text()


def _cells(line: str) -> list[str]:
    cells = re.split(r"(?<!\\)\|", line.strip().strip("|"))
    return [cell.strip().replace("\\|", "|") for cell in cells]


def table(caption: str) -> list[dict[str, str]]:
    """The markdown table under the line ``Table <n> <caption…>``, as dicts by header."""
    lines = document().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("Table ") and caption in line]
    assert len(starts) == 1, f"{len(starts)} tables captioned {caption!r}"
    i = starts[0] + 1
    while not lines[i].startswith("|"):
        assert not lines[i].strip(), f"no table right under {caption!r}"
        i += 1
    header = _cells(lines[i])
    assert set(_cells(lines[i + 1])) <= {"---"}, f"no separator row under {caption!r}"
    rows = []
    for line in lines[i + 2 :]:
        if not line.startswith("|"):
            break
        cells = _cells(line)
        assert len(cells) == len(header), line
        rows.append(dict(zip(header, cells, strict=True)))
    assert rows, f"empty table {caption!r}"
    return rows


def uids(rows: list[dict[str, str]], column: str = "UID") -> list[str]:
    return [row[column] for row in rows]


def _name(text: str) -> str:
    """SOP class names compared without dash, case and "SOP Class" suffix differences."""
    return re.sub(r"[\s\-–]+", " ", text).strip().lower().removesuffix(" sop class")


# -- SOP classes -----------------------------------------------------------------------------


def test_scp_sop_classes_are_the_listeners() -> None:
    rows = table("SOP classes of AE")
    scp = {row["SOP Class UID"] for row in rows if row["SCP"] == "Yes"}
    assert scp == {str(uid) for uid in STORAGE_SOP_CLASSES} | {str(VERIFICATION_SOP_CLASS)}
    for row in rows:
        assert _name(row["SOP Class"]) == _name(UID(row["SOP Class UID"]).name), row


def test_scu_sop_classes_are_the_registered_output_types_and_verification() -> None:
    from dicom_node.results.registry import get_output_type, output_names

    rows = table("SOP classes of AE")
    scu = {row["SOP Class UID"] for row in rows if row["SCU"] == "Yes"}
    outputs = {str(get_output_type(name).sop_class_uid) for name in output_names()}
    assert scu == outputs | {str(VERIFICATION_SOP_CLASS)}


def test_overview_lists_the_same_services_as_the_ae_specification() -> None:
    detailed = {_name(row["SOP Class"]): row for row in table("SOP classes of AE")}
    overview = [row for row in table("Network services") if not row["SOP Class"].startswith("*")]
    assert {_name(row["SOP Class"]) for row in overview} == set(detailed)
    for row in overview:
        roles = detailed[_name(row["SOP Class"])]
        assert row["User of service (SCU)"].startswith(roles["SCU"]), row
        assert row["Provider of service (SCP)"].startswith(roles["SCP"]), row


# -- transfer syntaxes -----------------------------------------------------------------------


def test_accepted_storage_transfer_syntaxes_in_the_listeners_order() -> None:
    rows = table("Transfer syntaxes accepted for storage")
    assert uids(rows) == [str(uid) for uid in STORAGE_TRANSFER_SYNTAXES]
    assert all(UID(uid).is_transfer_syntax for uid in uids(rows))


def test_accepted_verification_transfer_syntaxes() -> None:
    rows = table("Transfer syntaxes accepted for Verification")
    assert uids(rows) == [str(uid) for uid in VERIFICATION_SYNTAXES]


def test_proposed_transfer_syntaxes() -> None:
    from pynetdicom.presentation import build_context
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    from dicom_node.dispatch.dicom import UNCOMPRESSED_LE

    rows = table("Transfer syntaxes proposed for the node's objects")
    assert uids(rows) == [str(uid) for uid in UNCOMPRESSED_LE]
    echo = build_context(Verification)  # what destinations echo proposes
    rows = table("Transfer syntaxes proposed for Verification")
    assert uids(rows) == [str(uid) for uid in echo.transfer_syntax]


# -- statuses -----------------------------------------------------------------------------------


def test_c_store_statuses_sent_are_the_listeners() -> None:
    rows = table("C-STORE response statuses sent")
    assert [row["Status"] for row in rows] == [f"{status.value:04X}" for status in StoreStatus]


def _codes(status: str) -> list[int]:
    """The codes a status cell stands for: one code, or both ends of a range."""
    if status == "any other":
        return [0xD000, 0x0999]
    match = re.fullmatch(r"([0-9A-F]{4})[–-]([0-9A-F]{4})(?: \(others\))?", status)
    if match:
        return [int(match.group(1), 16), int(match.group(2), 16)]
    return [int(status, 16)]


def test_c_store_statuses_received_are_handled_as_documented() -> None:
    from dicom_node.dispatch import dicom

    rows = table("C-STORE response statuses received")
    for row in rows:
        for code in _codes(row["Status"]):
            status = dicom.classify_status(code)
            behaviour = (
                "delivered"
                if status.success
                else "retried"
                if status.retryable
                else "dead-lettered"
            )
            assert behaviour == row["Node behaviour"], (row, hex(code))
    documented = {row["Status"] for row in rows}
    for code in dicom._EXACT:
        assert f"{code:04X}" in documented, f"status {code:04X} is classified but not documented"


# -- association policies and configuration -----------------------------------------------------


def _setting(settings: NodeSettings, key: str) -> Any:
    value: Any = settings
    for part in key.removeprefix("node.").split("."):
        value = getattr(value, part)
    return list(value) if isinstance(value, tuple | list) else value


def test_configuration_defaults_are_the_listeners() -> None:
    settings = NodeSettings()
    rows = table("Configurable parameters of the listener")
    assert len(rows) >= 15
    for row in rows:
        key = row["Key"].strip("`")
        documented = tomllib.loads(f"value = {row['Default'].strip('`')}")["value"]
        assert _setting(settings, key) == documented, key


def test_implementation_identifiers_and_pdu_sizes() -> None:
    from pynetdicom import AE

    from dicom_node.listener import build_ae

    ae = build_ae(NodeSettings())
    rows = {row["Item"]: row["Value"] for row in table("Implementation identifying information")}
    assert rows["Implementation Class UID"] == ae.implementation_class_uid
    assert rows["Implementation Version Name"] == ae.implementation_version_name
    text = " ".join(document().split())
    assert f"announces {AE().maximum_pdu_size} bytes" in text  # as SCU: pynetdicom's default
    assert f"default {NodeSettings().max_pdu_size} bytes" in text


# -- created objects -----------------------------------------------------------------------------


def test_every_registered_output_type_is_documented_with_its_sop_class() -> None:
    from dicom_node.results.registry import get_output_type, output_names

    rows = {row["Output type"].strip("`"): row for row in table("Output types and the objects")}
    assert set(rows) == set(output_names())
    for name, row in rows.items():
        output_type = get_output_type(name)
        assert row["SOP Class UID"] == str(output_type.sop_class_uid), name
        assert _name(UID(row["SOP Class UID"]).name).startswith(_name(row["IOD"])), name


def test_equipment_identification_is_the_nodes() -> None:
    from dicom_node.results.common import Equipment, private_coding_scheme

    equipment = Equipment()
    text = " ".join(document().split())
    assert f'Manufacturer "{equipment.manufacturer}"' in text
    assert f'Manufacturer\'s Model Name "{equipment.model_name}"' in text
    scheme = private_coding_scheme()
    assert scheme.CodingSchemeDesignator == PRIVATE_SCHEME
    assert f'name "{scheme.CodingSchemeName}"' in text
    assert f'responsible organization "{scheme.CodingSchemeResponsibleOrganization}"' in text


@cache
def defined_codes() -> dict[tuple[str, str], str]:
    """(value, scheme) → meaning of every code the result writers define at module level
    (alone, in a dict, or as a ``(value, meaning, scheme)`` tuple of the private scheme)."""
    from highdicom.sr import CodedConcept
    from pydicom.sr.coding import Code

    import dicom_node.results as package

    codes: dict[tuple[str, str], str] = {}
    for module_info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{module_info.name}")
        for value in vars(module).values():
            for item in value.values() if isinstance(value, dict) else [value]:
                if isinstance(item, CodedConcept | Code):
                    codes[(str(item.value), str(item.scheme_designator))] = str(item.meaning)
                elif isinstance(item, tuple) and len(item) == 3 and item[2] == PRIVATE_SCHEME:
                    codes[(str(item[0]), PRIVATE_SCHEME)] = str(item[1])
    assert any(scheme == PRIVATE_SCHEME for _, scheme in codes)
    return codes


def test_private_codes_are_documented_with_their_meanings() -> None:
    private = {
        value: meaning
        for (value, scheme), meaning in defined_codes().items()
        if scheme == PRIVATE_SCHEME
    }
    rows = table("Private codes")
    assert {row["Code Value"]: row["Code Meaning"] for row in rows} == private


def test_standard_codes_are_documented() -> None:
    standard = {
        key: meaning for key, meaning in defined_codes().items() if key[1] != PRIVATE_SCHEME
    }
    rows = table("Standard codes used")
    documented = {
        (row["Code Value"], row["Coding Scheme Designator"]): row["Code Meaning"] for row in rows
    }
    assert documented == standard


def test_ps3_2_sections_are_present() -> None:
    headings = [
        "## 1. Conformance statement overview",
        "## 4. Networking",
        "#### 4.1.1 Application data flow",
        "#### 4.1.2 Functional definition of AEs",
        "#### 4.1.3 Sequencing of real-world activities",
        "##### 4.2.1.2 Association policies",
        "##### 4.2.1.3 Association initiation policy",
        "##### 4.2.1.4 Association acceptance policy",
        "### 4.3 Network interfaces",
        "### 4.4 Configuration",
        "## 5. Media interchange",
        "## 6. Support of character sets",
        "## 7. Security",
        "### 8.1 IOD contents",
        "### 8.3 Coded terminology and templates",
    ]
    for heading in headings:
        assert heading in document().splitlines(), heading
