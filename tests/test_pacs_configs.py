"""The PACS routing files of ``deploy/pacs/``: they parse, use only documented keys, agree
with the node's own code, and route the right images.

A PACS administrator copies these files into systems this suite cannot run (dcm4chee-arc,
Conquest, mercure), so each is checked the way its system reads it:

* **parse** — Orthanc's JSON (with its ``//`` and ``/* */`` comments), LDIF (blank-line
  separated entries of ``key: value``), Conquest's INI, mercure's JSON;
* **documented keys** — every key or LDAP attribute used is in a list kept here, copied
  from the system's documentation (Orthanc Book, dcm4chee-arc LDAP schema pages, the
  Conquest manual, mercure's ``common/types.py``);
* **the node's values** — AE title, port, the SOP classes the listener accepts, the
  manufacturer and series descriptions of the node's outputs;
* **decisions** — each file's filter is *evaluated* here as its system would (dcm4chee's
  ``dcmProperty`` conditions as full regular-expression matches, Conquest's
  ``ifequal``/``ifnotequal`` script, mercure's ``@Tag@`` Python expression, the Python
  router's own functions) on real headers: frontal chests from the shared data, a
  lateral, a hip, a tibia, an SR, and the node's own SR and heatmap SC built by its real
  builders — those arriving from the node and the heatmap re-stored by another AE.

``tests/e2e/test_pacs_routing.py`` runs the Orthanc routers against a real Orthanc.
"""

from __future__ import annotations

import configparser
import importlib.util
import json
import re
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.datadict import keyword_dict, keyword_for_tag
from pydicom.dataset import Dataset

from dicom_node.config import NodeSettings
from dicom_node.contexts import STORAGE_SOP_CLASSES
from tests.support import REPO_ROOT

PACS_DIR = REPO_ROOT / "deploy" / "pacs"
ORTHANC_DIR = PACS_DIR / "orthanc"
LDIF_PATH = PACS_DIR / "dcm4chee-arc" / "cxr-ai-node.ldif"
CONQUEST_INI = PACS_DIR / "conquest" / "dicom.ini"
MERCURE_JSON = PACS_DIR / "mercure" / "config.json"
TARGET = "cxr-ai-node"
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI")

# -- documented keys -----------------------------------------------------------------------

# Orthanc Book, "Configuration of Orthanc" and the Python plugin page.
ORTHANC_KEYS = {
    "DicomModalities",
    "UserMetadata",
    "StableAge",
    "LuaScripts",
    "Plugins",
    "PythonScript",
    "PythonVerbose",
}
ORTHANC_MODALITY_KEYS = {
    "AET",
    "Host",
    "Port",
    "Manufacturer",
    "AllowEcho",
    "AllowFind",
    "AllowFindWorklist",
    "AllowMove",
    "AllowGet",
    "AllowStore",
    "AllowStorageCommitment",
    "AllowTranscoding",
    "UseDicomTls",
    "LocalAet",
    "Timeout",
}
# LDAP attributes per object class: DICOM Application Configuration Management (PS3.15
# Annex H) for devices, connections and AEs; dcm4chee-arc's "Exporter Descriptor" and
# "Export Rule" pages for the rest.
LDAP_ATTRIBUTES: dict[str, set[str]] = {
    "dicomDevice": {
        "dicomDeviceName",
        "dicomDescription",
        "dicomManufacturer",
        "dicomManufacturerModelName",
        "dicomStationName",
        "dicomInstalled",
    },
    "dicomNetworkConnection": {
        "cn",
        "dicomHostname",
        "dicomPort",
        "dicomTLSCipherSuite",
        "dicomInstalled",
    },
    "dicomNetworkAE": {
        "dicomAETitle",
        "dicomDescription",
        "dicomNetworkConnectionReference",
        "dicomAssociationInitiator",
        "dicomAssociationAcceptor",
        "dicomSupportedCharacterSet",
        "dicomInstalled",
    },
    "dicomUniqueAETitle": {"dicomAETitle"},
    "dcmExporter": {
        "dcmExporterID",
        "dcmURI",
        "dcmQueueName",
        "dcmExportPriority",
        "dicomDescription",
        "dicomAETitle",
        "dcmExportAsSourceAE",
        "dcmStgCmtSCP",
        "dcmIanDestination",
        "dcmRetrieveAET",
        "dcmSchedule",
        "dcmProperty",
    },
    "dcmExportRule": {
        "cn",
        "dcmEntity",
        "dcmExporterID",
        "dcmProperty",
        "dcmSchedule",
        "dcmDuration",
        "dcmExportPreviousEntity",
        "dcmExportReoccurredInstances",
        "dicomDeviceName",
    },
}
DCM4CHEE_ENTITIES = {"Patient", "Study", "Series", "Instance"}
DCM4CHEE_REOCCURRED = {"NEVER", "ALWAYS", "REPLACE"}
DCM4CHEE_QUEUES = {f"Export{n}" for n in range(1, 11)}
# Condition keys besides attribute keywords (dcm4chee-arc wiki, "Conditions").
DCM4CHEE_CONDITION_KEYS = {
    "SendingHostname",
    "SendingApplicationEntityTitle",
    "ReceivingHostname",
    "ReceivingApplicationEntityTitle",
}
# Conquest DICOM server manual, "Export converters".
CONQUEST_KEYS = re.compile(
    r"ExportConverters|Export(Modality|CallingAE|CalledAE|StationName|Filter|Converter)\d+"
)
# mercure common/types.py: DicomTarget and Rule.
MERCURE_TARGET_KEYS = {
    "target_type",
    "ip",
    "port",
    "aet_target",
    "aet_source",
    "contact",
    "comment",
}
MERCURE_RULE_KEYS = {
    "rule",
    "target",
    "disabled",
    "fallback",
    "contact",
    "comment",
    "tags",
    "action",
    "action_trigger",
    "study_trigger_condition",
    "study_trigger_series",
    "priority",
    "processing_module",
    "processing_settings",
    "processing_retain_images",
    "notification_email",
    "notification_webhook",
    "notification_payload",
    "notification_payload_body",
    "notification_email_body",
    "notification_email_type",
    "notification_trigger_reception",
    "notification_trigger_completion",
    "notification_trigger_completion_on_request",
    "notification_trigger_error",
}
# What mercure's receiver (getdcmtags) writes into every series' tags file, so what a
# rule can name; a tag outside it stays "@Tag@" and makes the rule false.
MERCURE_TAGS = {
    "SpecificCharacterSet",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "SenderAddress",
    "SenderAET",
    "ReceiverAET",
    "Modality",
    "BodyPartExamined",
    "ProtocolName",
    "RetrieveAETitle",
    "StationAETitle",
    "Manufacturer",
    "ManufacturerModelName",
    "StudyDescription",
    "CodeValue",
    "CodeMeaning",
    "SeriesDescription",
    "StudyInstanceUID",
    "SeriesNumber",
    "StationName",
    "DeviceSerialNumber",
    "SoftwareVersions",
    "ImageComments",
    "InstanceNumber",
    "InstitutionName",
    "MediaStorageSOPClassUID",
    "ImageType",
}


# -- parsers -------------------------------------------------------------------------------


def strip_json_comments(text: str) -> str:
    """Orthanc's JSON: ``//`` and ``/* */`` comments outside strings removed."""
    out: list[str] = []
    i, in_string = 0, False
    while i < len(text):
        char = text[i]
        if in_string:
            out.append(char)
            if char == "\\":
                out.append(text[i + 1])
                i += 1
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
            out.append(char)
        elif text.startswith("//", i):
            i = text.find("\n", i)
            i = len(text) if i < 0 else i
            continue
        elif text.startswith("/*", i):
            i = text.index("*/", i) + 2
            continue
        else:
            out.append(char)
        i += 1
    return "".join(out)


def orthanc_json(name: str = "orthanc.json") -> dict[str, Any]:
    """A shipped Orthanc configuration snippet, as Orthanc reads it."""
    result: dict[str, Any] = json.loads(strip_json_comments((ORTHANC_DIR / name).read_text()))
    return result


@dataclass
class LdifEntry:
    dn: str
    attributes: list[tuple[str, str]]

    def values(self, key: str) -> list[str]:
        return [value for name, value in self.attributes if name == key]

    def value(self, key: str) -> str:
        (found,) = self.values(key)
        return found


def parse_ldif(text: str) -> list[LdifEntry]:
    """LDIF: entries separated by blank lines, ``key: value`` lines (``#`` comments,
    a line starting with one space continues the previous one); each entry starts with
    ``dn``."""
    entries: list[LdifEntry] = []
    for block in re.split(r"\n\s*\n", text):
        lines: list[str] = []
        for line in block.splitlines():
            if line.startswith("#"):
                continue
            if line.startswith(" ") and lines:
                lines[-1] += line[1:]
            elif line.strip():
                lines.append(line)
        if not lines:
            continue
        pairs = []
        for line in lines:
            key, sep, value = line.partition(":")
            assert sep and re.fullmatch(r"[A-Za-z][A-Za-z0-9-]*", key), f"not key: value: {line}"
            assert not value.startswith(":"), f"base64 values are not expected: {line}"
            pairs.append((key, value.strip()))
        assert pairs[0][0] == "dn", f"entry does not start with dn: {lines[0]}"
        entries.append(LdifEntry(pairs[0][1], pairs[1:]))
    return entries


def conquest_ini() -> dict[str, str]:
    parser = configparser.ConfigParser(interpolation=None, comment_prefixes=("#",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keep key case
    parser.read_string(CONQUEST_INI.read_text())
    assert parser.sections() == ["sscscp"]
    return dict(parser["sscscp"])


def mercure_config() -> dict[str, Any]:
    result: dict[str, Any] = json.loads(MERCURE_JSON.read_text())
    return result


# -- what the node is ----------------------------------------------------------------------


@cache
def node_facts() -> dict[str, Any]:
    from dicom_node.results.common import Equipment
    from dicom_node.results.heatmap_sc import SC_SERIES_DESCRIPTION
    from dicom_node.results.sr import SR_SERIES_DESCRIPTION

    node = NodeSettings()
    equipment = Equipment()
    return {
        "aet": node.ae_title,
        "port": node.port,
        "manufacturer": equipment.manufacturer,
        "model_name": equipment.model_name,
        "series": (SR_SERIES_DESCRIPTION, SC_SERIES_DESCRIPTION),
    }


def load_python_router() -> types.ModuleType:
    """``autoroute.py`` imported with a stand-in ``orthanc`` module (its rules are plain
    functions; the router thread is stopped again at once)."""
    fake = types.ModuleType("orthanc")

    class OrthancException(Exception):
        pass

    fake.OrthancException = OrthancException  # type: ignore[attr-defined]
    fake.ChangeType = types.SimpleNamespace(  # type: ignore[attr-defined]
        NEW_INSTANCE=1, STABLE_STUDY=2, ORTHANC_STOPPED=3
    )
    for name in ("LogWarning", "LogError", "LogInfo", "RegisterOnChangeCallback"):
        setattr(fake, name, lambda *args: None)
    previous = sys.modules.get("orthanc")
    sys.modules["orthanc"] = fake
    try:
        spec = importlib.util.spec_from_file_location("cxr_autoroute", ORTHANC_DIR / "autoroute.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if previous is None:
            sys.modules.pop("orthanc", None)
        else:
            sys.modules["orthanc"] = previous
    module.ROUTER.events.put(None)
    module.ROUTER.thread.join(timeout=5)
    return module


def lua_settings() -> dict[str, str]:
    """``NAME = "value"`` settings at the top of ``autoroute.lua``."""
    text = (ORTHANC_DIR / "autoroute.lua").read_text()
    return dict(re.findall(r'^([A-Z_]+) = "([^"]*)"', text, re.M))


def lua_set(name: str) -> set[str]:
    """The keys (``["x"] = true`` / ``X = true``) or strings of a Lua table literal."""
    text = (ORTHANC_DIR / "autoroute.lua").read_text()
    match = re.search(rf"^{name} = \{{(.*?)\}}[ \t]*$", text, re.M | re.S)
    assert match, f"{name} not found in autoroute.lua"
    body = re.sub(r"--[^\n]*", "", match.group(1))
    keys = re.findall(r'\["([^"]+)"\]\s*=\s*true', body)
    keys += re.findall(r"\b([A-Z]+)\s*=\s*true", body)
    return set(keys) or set(re.findall(r'"([^"]+)"', body))


# -- the cases -----------------------------------------------------------------------------


def simplified(ds: Dataset) -> dict[str, Any]:
    """A header as Orthanc's simplified tags: keyword → text (multi-values joined by a
    backslash), sequences as lists of such dicts; no bulk data, no private tags."""
    tags: dict[str, Any] = {}
    for elem in ds:
        if elem.tag.is_private or not elem.keyword or elem.VR in ("OB", "OW", "OF", "UN"):
            continue
        if elem.VR == "SQ":
            tags[elem.keyword] = [simplified(item) for item in elem.value]
        elif elem.value is None:
            tags[elem.keyword] = ""
        elif elem.VM > 1:
            tags[elem.keyword] = "\\".join(str(v) for v in elem.value)
        else:
            tags[elem.keyword] = str(elem.value)
    return tags


@dataclass(frozen=True)
class Case:
    """An object arriving at the PACS, and whether it is an image for the node."""

    name: str
    header: Dataset
    calling_ae: str
    frontal_chest: bool
    body_part_known: bool = True  # False: chest named only by a description

    @property
    def tags(self) -> dict[str, Any]:
        return simplified(self.header)


def _read(data_dir: Path, name: str) -> Dataset:
    return pydicom.dcmread(data_dir / "dicom" / name, stop_before_pixels=True)


@pytest.fixture(scope="module")
def cases(data_dir: Path) -> list[Case]:
    from dicom_node.results.common import Equipment
    from dicom_node.results.heatmap_sc import heatmap_secondary_capture
    from dicom_node.results.sr import measurement_report
    from tests.results_data import make_result, read_source

    aet = node_facts()["aet"]
    source = read_source("siim-cr-jpegbaseline.dcm")
    equipment = Equipment(station_name=aet)
    result = make_result(source)
    node_sc = heatmap_secondary_capture(source, result, equipment=equipment)
    # The builder can file the heatmap under the source's Modality (CR) for a PACS that
    # wants that: then only the node's own marks (calling AE, manufacturer, series) tell.
    node_sc_cr = heatmap_secondary_capture(source, result, equipment=equipment, modality="CR")
    node_sr = measurement_report(source, result, equipment=equipment)

    lateral = _read(data_dir, "rg1-chest-cr-mono1-j2k.dcm")
    lateral.ViewPosition = "LL"
    lateral.SeriesDescription = "CHEST LAT"
    by_description = _read(data_dir, "nih-00000001_000-dx-sc.dcm")
    by_description.StudyDescription = "XR CHEST PA"
    return [
        Case("cr-chest-pa", _read(data_dir, "rg1-chest-cr-mono1-j2k.dcm"), "CR_ROOM_1", True),
        Case("sc-chest-pa", _read(data_dir, "siim-cr-jpegbaseline.dcm"), "CR_ROOM_1", True),
        Case("dx-chest-by-description", by_description, "DX_ROOM", True, body_part_known=False),
        Case("cr-chest-lateral", lateral, "CR_ROOM_1", False),
        Case("cr-hip", _read(data_dir, "rg2-hip-cr-jpeglossless.dcm"), "CR_ROOM_1", False),
        Case("cr-tibia", _read(data_dir, "rg3-tibia-cr-j2k-lossless.dcm"), "CR_ROOM_1", False),
        Case("sr", _read(data_dir, "example-tid1500-sr.dcm"), "WORKSTATION", False),
        Case("node-sr", node_sr, aet, False),
        Case("node-heatmap-sc", node_sc, aet, False),
        # The node's heatmap stored again by someone else (an archive migration, another
        # router): Modality CR, Body Part CHEST, an SC class the node accepts.
        Case("node-heatmap-sc-restored", node_sc, "MIGRATION", False),
        Case("node-heatmap-sc-as-cr", node_sc_cr, aet, False),
        Case("node-heatmap-sc-as-cr-restored", node_sc_cr, "MIGRATION", False),
    ]


def _check(cases: list[Case], decide: Callable[[Case], bool], *, by_description: bool) -> None:
    decisions = {case.name: decide(case) for case in cases}
    expected = {
        case.name: case.frontal_chest and (case.body_part_known or by_description) for case in cases
    }
    assert decisions == expected


# -- Orthanc -------------------------------------------------------------------------------


def test_orthanc_snippets_parse_with_documented_keys_and_the_nodes_values() -> None:
    facts = node_facts()
    snippet = orthanc_json()
    assert set(snippet) <= ORTHANC_KEYS
    modality = snippet["DicomModalities"][TARGET]
    assert set(modality) <= ORTHANC_MODALITY_KEYS
    assert modality["AET"] == facts["aet"] and modality["Port"] == facts["port"]
    assert modality["AllowStore"] is True  # the node stores its results back
    (metadata,) = snippet["UserMetadata"].items()
    assert 1024 <= metadata[1] <= 65535  # Orthanc's range for user metadata
    (script,) = snippet["LuaScripts"]
    assert script.endswith("/autoroute.lua")
    python = orthanc_json("python.json")
    assert set(python) <= ORTHANC_KEYS and python["PythonScript"].endswith("/autoroute.py")

    lua = lua_settings()
    router = load_python_router()
    for settings in (lua, vars(router)):
        assert settings["TARGET_MODALITY"] == TARGET
        assert settings["NODE_AET"] == facts["aet"]
        assert settings["NODE_MANUFACTURER"] == facts["manufacturer"]
        assert settings["NODE_MODEL_NAME"] == facts["model_name"]
        assert settings["FORWARDED_METADATA"] == metadata[0]
        assert settings["FORWARD_WHEN"] == "instance"
        assert all(s.startswith(settings["NODE_SERIES_PREFIX"]) for s in facts["series"])


def test_orthanc_routers_forward_exactly_the_classes_the_listener_accepts() -> None:
    accepted = {str(uid) for uid in STORAGE_SOP_CLASSES}
    assert lua_set("FORWARD_SOP_CLASSES") == accepted
    assert set(load_python_router().FORWARD_SOP_CLASSES) == accepted


def test_lua_and_python_routers_use_the_same_rules() -> None:
    router = load_python_router()
    assert lua_set("FORWARD_MODALITIES") == router.FORWARD_MODALITIES
    assert lua_set("NODE_MODALITIES") == router.NODE_MODALITIES
    assert lua_set("NON_FRONTAL_VIEWS") == router.NON_FRONTAL_VIEWS
    assert lua_set("CHEST_WORDS") == set(router.CHEST_WORDS)
    assert lua_set("CHEST_CODES") == router.CHEST_CODES
    assert lua_set("DESCRIPTIONS") == set(router.DESCRIPTIONS)
    words = re.findall(r"[A-Z]+", router.NON_FRONTAL_WORDS.pattern)
    assert lua_set("NON_FRONTAL_WORDS") == set(words)


def test_python_router_decisions(cases: list[Case]) -> None:
    router = load_python_router()

    def forwards(case: Case) -> bool:
        tags = case.tags
        return not (router.node_made_it(tags, case.calling_ae) or router.not_a_frontal_chest(tags))

    _check(cases, forwards, by_description=True)


def test_python_router_says_why_it_refuses(cases: list[Case]) -> None:
    router = load_python_router()
    reasons = {
        case.name: router.node_made_it(case.tags, case.calling_ae)
        or router.not_a_frontal_chest(case.tags)
        for case in cases
    }
    assert "not frontal" in reasons["cr-chest-lateral"]
    assert "not a chest" in reasons["cr-hip"]
    assert "sent by the node" in reasons["node-heatmap-sc"]
    assert reasons["node-heatmap-sc-as-cr-restored"].startswith("made by")
    assert reasons["sr"] == "a structured report"


# -- dcm4chee-arc --------------------------------------------------------------------------


def ldif_entries() -> list[LdifEntry]:
    return parse_ldif(LDIF_PATH.read_text())


def test_ldif_parses_with_documented_attributes_and_consistent_references() -> None:
    facts = node_facts()
    entries = ldif_entries()
    dns = {entry.dn for entry in entries}
    assert len(dns) == len(entries)
    for entry in entries:
        (object_class,) = entry.values("objectClass")
        allowed = LDAP_ATTRIBUTES[object_class]
        for key, _ in entry.attributes:
            assert key == "objectClass" or key in allowed, f"{entry.dn}: {key} not documented"
        rdn_key, rdn_value = entry.dn.split(",")[0].split("=", 1)
        assert entry.value(rdn_key) == rdn_value, entry.dn
        for reference in entry.values("dicomNetworkConnectionReference"):
            assert reference in dns
    by_class = {entry.value("objectClass"): entry for entry in entries}
    assert by_class["dicomNetworkAE"].value("dicomAETitle") == facts["aet"]
    assert by_class["dicomUniqueAETitle"].value("dicomAETitle") == facts["aet"]
    assert int(by_class["dicomNetworkConnection"].value("dicomPort")) == facts["port"]
    exporter, rule = by_class["dcmExporter"], by_class["dcmExportRule"]
    assert exporter.value("dcmURI") == f"dicom:{facts['aet']}"
    assert exporter.value("dcmQueueName") in DCM4CHEE_QUEUES
    assert rule.value("dcmExporterID") == exporter.value("dcmExporterID")
    assert rule.value("dcmEntity") in DCM4CHEE_ENTITIES
    assert rule.value("dcmExportReoccurredInstances") in DCM4CHEE_REOCCURRED
    assert re.fullmatch(r"P(\d+D)?(T(\d+H)?(\d+M)?(\d+(\.\d+)?S)?)?", rule.value("dcmDuration"))


def dcm4chee_conditions() -> list[tuple[str, bool, re.Pattern[str]]]:
    """(key, negated, pattern) of the export rule's dcmProperty values."""
    (rule,) = [e for e in ldif_entries() if e.value("objectClass") == "dcmExportRule"]
    conditions = []
    for condition in rule.values("dcmProperty"):
        match = re.fullmatch(r"([A-Za-z0-9.]+)(!?)=(.+)", condition)
        assert match, f"not a condition: {condition}"
        key, negated, value = match.groups()
        assert key in DCM4CHEE_CONDITION_KEYS or key in keyword_dict, key
        conditions.append((key, negated == "!", re.compile(value)))
    keys = [key for key, _, _ in conditions]
    assert len(keys) == len(set(keys)), "dcmProperty keys are a map: one condition per key"
    return conditions


def test_dcm4chee_export_rule_decisions(cases: list[Case]) -> None:
    """Conditions as dcm4chee-arc applies them: the value must match the whole pattern
    (Java ``matches``); ``!=`` inverts; an absent attribute matches nothing."""
    conditions = dcm4chee_conditions()

    def forwards(case: Case) -> bool:
        values = dict(case.tags, SendingApplicationEntityTitle=case.calling_ae)
        for key, negated, pattern in conditions:
            value = values.get(key)
            parts = str(value).split("\\") if value not in (None, "") else []
            matched = any(pattern.fullmatch(part) for part in parts)
            if matched == negated:
                return False
        return True

    _check(cases, forwards, by_description=False)


def test_dcm4chee_sop_class_condition_is_the_listeners() -> None:
    (pattern,) = [p for key, _, p in dcm4chee_conditions() if key == "SOPClassUID"]
    for uid in STORAGE_SOP_CLASSES:
        assert pattern.fullmatch(str(uid)), uid
    for refused in ("1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.2"):
        assert not pattern.fullmatch(refused)


# -- Conquest ------------------------------------------------------------------------------


Statement = tuple[str, list[str]]  # (command, arguments) or ("{", nested statements)


def parse_converter(script: str) -> list[Any]:
    """A Conquest converter script: ``;``-separated statements and ``{ … }`` blocks.
    Known statements only: ifequal/ifnotequal "a","b" — forward to AE — stop — nop."""
    tokens = re.findall(r'\{|\}|;|"[^"]*"\s*,\s*"[^"]*"|[^;{}"]+', script)
    stack: list[list[Any]] = [[]]
    pending = ""
    for token in tokens + [";"]:
        if token in ("{", "}", ";"):
            if pending.strip():
                stack[-1].append(_statement(pending.strip()))
            pending = ""
            if token == "{":
                stack.append([])
            elif token == "}":
                block = stack.pop()
                stack[-1].append(("{", block))
        else:
            pending += token
    assert len(stack) == 1, f"unbalanced braces in {script!r}"
    return stack[0]


def _statement(text: str) -> Statement:
    match = re.fullmatch(r'(ifequal|ifnotequal)\s+"([^"]*)"\s*,\s*"([^"]*)"', text)
    if match:
        for argument in match.group(2, 3):
            variables = re.sub(r"%[ucm]|%V[0-9A-Fa-f]{4},[0-9A-Fa-f]{4}", "", argument)
            assert "%" not in variables, f"unknown variable in {argument!r}"
        return match.group(1), [match.group(2), match.group(3)]
    match = re.fullmatch(r"forward to ([A-Za-z0-9_ -]{1,16})", text)
    if match:
        return "forward", [match.group(1)]
    assert text in ("stop", "nop"), f"unknown converter statement: {text!r}"
    return text, []


def run_converter(statements: list[Any], case: Case) -> list[str]:
    """The AE titles the script forwards ``case`` to (if* skips the next statement when
    its test fails)."""
    tags = case.tags

    def value(text: str) -> str:
        def tag_value(match: re.Match[str]) -> str:
            tag = int(match.group(1) + match.group(2), 16)
            found = tags.get(keyword_for_tag(tag) or "", "")
            return found if isinstance(found, str) else ""

        text = re.sub(r"%V([0-9A-Fa-f]{4}),([0-9A-Fa-f]{4})", tag_value, text)
        return text.replace("%u", case.calling_ae).replace("%m", str(tags.get("Modality", "")))

    forwarded: list[str] = []
    skip = False
    for statement in statements:
        if skip:
            skip = False
            continue
        command, arguments = statement
        if command == "{":
            forwarded += run_converter(arguments, case)
        elif command in ("ifequal", "ifnotequal"):
            equal = value(arguments[0]) == value(arguments[1])
            skip = equal != (command == "ifequal")
        elif command == "forward":
            forwarded.append(arguments[0])
        elif command == "stop":
            break
    return forwarded


def conquest_converters() -> list[tuple[dict[str, str], list[Any]]]:
    ini = conquest_ini()
    for key in ini:
        assert CONQUEST_KEYS.fullmatch(key), f"undocumented key {key}"
    count = int(ini["ExportConverters"])
    converters = []
    for index in range(count):
        filters = {
            name: ini.get(f"Export{name}{index}", "*")
            for name in ("Modality", "CallingAE", "CalledAE", "StationName")
        }
        converters.append((filters, parse_converter(ini[f"ExportConverter{index}"])))
    assert not any(f"ExportConverter{count}" in key for key in ini)
    return converters


def test_conquest_ini_parses_with_documented_keys_and_known_statements() -> None:
    converters = conquest_converters()
    assert len(converters) == 2
    assert {filters["Modality"] for filters, _ in converters} == {"CR", "DX"}
    assert "forward to CXR_AI" in CONQUEST_INI.read_text()
    node_line = re.search(r"^#\s+(\S+)\s+\S+\s+(\d+)\s+un$", CONQUEST_INI.read_text(), re.M)
    assert node_line and node_line.group(1) == node_facts()["aet"]
    assert int(node_line.group(2)) == node_facts()["port"]


def test_conquest_export_converter_decisions(cases: list[Case]) -> None:
    converters = conquest_converters()

    def forwards(case: Case) -> bool:
        targets: list[str] = []
        for filters, statements in converters:
            modality = filters["Modality"]
            if modality in ("*", case.tags.get("Modality")):
                targets += run_converter(statements, case)
        assert targets in ([], [node_facts()["aet"]]), targets  # once at most
        return bool(targets)

    _check(cases, forwards, by_description=False)


# -- mercure -------------------------------------------------------------------------------


def mercure_evaluate(rule: str, tags: dict[str, str]) -> Any:
    """mercure's rule evaluation (common/rule_evaluation.py): each ``@Tag@`` replaced by
    the quoted value, then ``eval`` without builtins but ``float``, ``int``, ``str``."""
    for tag in set(re.findall(r"@(\w+)@", rule)):
        if tag in tags:
            rule = rule.replace(f"@{tag}@", "'" + tags[tag] + "'")
    return eval(rule, {"__builtins__": {}}, {"float": float, "int": int, "str": str})  # noqa: S307


def test_mercure_fragment_parses_with_documented_keys() -> None:
    facts = node_facts()
    config = mercure_config()
    assert set(config) == {"targets", "rules"}
    target = config["targets"][TARGET]
    assert set(target) <= MERCURE_TARGET_KEYS
    assert target["target_type"] == "dicom"
    assert target["aet_target"] == facts["aet"] and int(target["port"]) == facts["port"]
    assert isinstance(target["port"], str)  # mercure's DicomTarget.port is a string
    rule = config["rules"][TARGET]
    assert set(rule) <= MERCURE_RULE_KEYS
    assert rule["target"] == TARGET and rule["action"] == "route"
    assert rule["action_trigger"] in ("series", "study")
    assert set(re.findall(r"@(\w+)@", rule["rule"])) <= MERCURE_TAGS


def test_mercure_rule_decisions(cases: list[Case]) -> None:
    rule = mercure_config()["rules"][TARGET]["rule"]

    def forwards(case: Case) -> bool:
        tags = {name: str(case.tags.get(name, "")) for name in MERCURE_TAGS}
        tags["SenderAET"] = case.calling_ae
        return bool(mercure_evaluate(rule, tags))

    _check(cases, forwards, by_description=True)


def test_every_file_names_the_node_by_its_default_ae_title() -> None:
    aet = node_facts()["aet"]
    for path in (LDIF_PATH, CONQUEST_INI, MERCURE_JSON, ORTHANC_DIR / "orthanc.json"):
        assert aet in path.read_text(), path
