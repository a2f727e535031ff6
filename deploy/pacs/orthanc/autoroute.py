"""Orthanc auto-routing to the CXR AI node (Orthanc Python plugin, Debian ``orthanc-python``).

The same rules as ``autoroute.lua`` beside this file; use one of the two, not both.

Forwards every frontal chest radiograph Orthanc stores to the node, once:

* CR, DX (for presentation and for processing) and Secondary Capture images whose
  Modality is CR or DX;
* chest: Body Part Examined names the chest (CHEST, THORAX, LUNG…), or is empty and a
  description or the Anatomic Region Sequence does;
* frontal: no lateral, oblique or decubitus View Position, View Code Sequence or
  description, no one-sided Image Laterality; human (no other species named).

Never forwarded, so results never loop back to the node:

* anything the node sent (calling AE title ``NODE_AET``);
* the node's own objects, whoever stored them: SR (SOP classes 1.2.840.10008.5.1.4.1.1.88.*),
  Modality OT/SR/SEG/PR/KO, Manufacturer ``NODE_MANUFACTURER``, Manufacturer's Model Name
  ``NODE_MODEL_NAME``, Series Description starting with ``NODE_SERIES_PREFIX``.

``FORWARD_WHEN = "instance"`` forwards each image as it arrives (lowest latency);
``"stable-study"`` forwards a study's eligible images once it is stable (``StableAge``).
In both modes a stable study is swept for eligible images not forwarded yet, and an image
is forwarded at most once: its Orthanc ID is remembered in memory and, when the
``UserMetadata`` entry ``FORWARDED_METADATA`` exists in orthanc.json, in the image's
metadata, which survives restarts. A study that becomes stable twice (the node's own
results arrive in it, or a late image) is therefore not forwarded again.

Orthanc calls the change callback on its own thread; the REST calls and the forwarding
happen on one worker thread of this script, which hands each batch of eligible images
to Orthanc as one asynchronous C-STORE job (one association). Install: see README.md.
"""

from __future__ import annotations

import json
import queue
import re
import threading
import time
from typing import Any

import orthanc

# -------------------------------------------------------------------- settings (edit these)
TARGET_MODALITY = "cxr-ai-node"  # the node's entry in "DicomModalities"
NODE_AET = "CXR_AI"  # the node's AE title ([node] ae_title)
NODE_MANUFACTURER = "CXR AI Node project"  # Manufacturer of the node's SR and SC
NODE_MODEL_NAME = "cxr-ai-node"  # Manufacturer's Model Name of the same
NODE_SERIES_PREFIX = "AI CXR"  # Series Description of the node's series
FORWARD_WHEN = "instance"  # "instance" or "stable-study"
FORWARDED_METADATA: str | None = "CxrAiForwarded"  # a "UserMetadata" name, or None
BATCH_WAIT_S = 0.2  # gather images arriving together into one job
VERBOSE = False  # log every decision, not only forwards

# ----------------------------------------------------------------------------- the rules
FORWARD_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1": "CR Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image, for presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image, for processing",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image",
    "1.2.840.10008.5.1.4.1.1.7.2": "Multi-frame Grayscale Byte SC",
    "1.2.840.10008.5.1.4.1.1.7.3": "Multi-frame Grayscale Word SC",
}
FORWARD_MODALITIES = {"CR", "DX"}
NODE_MODALITIES = {"OT", "SR", "SEG", "PR", "KO"}
SR_SOP_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
CHEST_WORDS = ("CHEST", "THORAX", "THORACIC", "LUNG", "CXR", "TORAX", "THORAKS")
CHEST_CODES = {"51185008", "T-D3000", "43799004"}
NON_FRONTAL_VIEWS = {"LL", "RL", "LAT", "LATERAL", "LLD", "RLD"}
NON_FRONTAL_VIEWS |= {"LLO", "RLO", "LAO", "RAO", "LPO", "RPO"}
NON_FRONTAL_WORDS = re.compile(r"\b(LAT|LATERAL|LATERALE|OBLIQUE|DECUBITUS|DECUB)\b")
DESCRIPTIONS = (
    "StudyDescription",
    "SeriesDescription",
    "ProtocolName",
    "RequestedProcedureDescription",
    "PerformedProcedureStepDescription",
)


def _text(value: Any) -> str:
    return value.strip().upper() if isinstance(value, str) else ""


def _items(value: Any) -> list[dict[str, Any]]:
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def node_made_it(tags: dict[str, Any], remote_aet: str | None) -> str | None:
    """Why the instance was made by the node, or None."""
    if _text(remote_aet) == _text(NODE_AET):
        return f"sent by the node ({NODE_AET})"
    if str(tags.get("SOPClassUID", "")).startswith(SR_SOP_CLASS_PREFIX):
        return "a structured report"
    modality = _text(tags.get("Modality"))
    if modality in NODE_MODALITIES:
        return f"Modality {modality}"
    manufacturers = {
        _text(tags.get("Manufacturer")),
        _text(tags.get("SecondaryCaptureDeviceManufacturer")),
    }
    if _text(NODE_MANUFACTURER) in manufacturers:
        return f"made by {NODE_MANUFACTURER}"
    if _text(tags.get("ManufacturerModelName")) == _text(NODE_MODEL_NAME):
        return f"made by {NODE_MODEL_NAME}"
    series = _text(tags.get("SeriesDescription"))
    if series.startswith(_text(NODE_SERIES_PREFIX)):
        return f"a series of the node ({series})"
    return None


def _chest(tags: dict[str, Any]) -> bool:
    body_part = _text(tags.get("BodyPartExamined"))
    if body_part:
        return any(word in body_part for word in CHEST_WORDS)
    for region in _items(tags.get("AnatomicRegionSequence")):
        meaning = _text(region.get("CodeMeaning"))
        if _text(region.get("CodeValue")) in CHEST_CODES or any(w in meaning for w in CHEST_WORDS):
            return True
    return any(word in _text(tags.get(key)) for key in DESCRIPTIONS for word in CHEST_WORDS)


def not_a_frontal_chest(tags: dict[str, Any]) -> str | None:
    """Why the instance is not a frontal chest radiograph for the node, or None."""
    sop_class = str(tags.get("SOPClassUID", ""))
    if sop_class not in FORWARD_SOP_CLASSES:
        return f"SOP class {sop_class} is not a radiograph the node accepts"
    modality = _text(tags.get("Modality"))
    if modality not in FORWARD_MODALITIES:
        return f"Modality {modality} is not CR or DX"
    if not _chest(tags):
        return f"not a chest (Body Part Examined {_text(tags.get('BodyPartExamined'))!r})"
    view = _text(tags.get("ViewPosition"))
    if view in NON_FRONTAL_VIEWS:
        return f"View Position {view} is not frontal"
    for code in _items(tags.get("ViewCodeSequence")):
        meaning = _text(code.get("CodeMeaning"))
        if any(word in meaning for word in ("LATERAL", "OBLIQUE", "DECUBITUS")):
            return "View Code Sequence is not frontal"
    for key in DESCRIPTIONS:
        if NON_FRONTAL_WORDS.search(re.sub(r"[^A-Z0-9]", " ", _text(tags.get(key)))):
            return f"{key} names a non-frontal view"
    laterality = _text(tags.get("ImageLaterality"))
    if laterality in ("L", "R"):
        return f"one-sided (Image Laterality {laterality})"
    species = _text(tags.get("PatientSpeciesDescription"))
    if species and species not in ("HOMO SAPIENS", "HUMAN"):
        return "not a human patient"
    if _text(tags.get("PatientBreedDescription")):
        return "a veterinary study"
    return None


# --------------------------------------------------------------------------- the router


def _get_json(uri: str) -> Any:
    """GET on Orthanc's built-in REST API; None when the resource is gone."""
    try:
        return json.loads(orthanc.RestApiGet(uri))
    except orthanc.OrthancException:
        return None


class Router:
    """Decides and forwards on one worker thread, fed by Orthanc's change callback."""

    def __init__(self) -> None:
        self.events: queue.Queue[tuple[str, str] | None] = queue.Queue()
        self.forwarded: set[str] = set()
        self.metadata = FORWARDED_METADATA
        self.thread = threading.Thread(target=self.run, name="cxr-ai-autoroute", daemon=True)

    # -- Orthanc's thread: only queue
    def on_change(self, change_type: int, level: int, resource_id: str) -> None:
        if change_type == orthanc.ChangeType.NEW_INSTANCE and FORWARD_WHEN == "instance":
            self.events.put(("instance", resource_id))
        elif change_type == orthanc.ChangeType.STABLE_STUDY:
            self.events.put(("study", resource_id))
        elif change_type == orthanc.ChangeType.ORTHANC_STOPPED:
            self.events.put(None)
            self.thread.join(timeout=10)

    # -- the worker thread
    def run(self) -> None:
        while True:
            event = self.events.get()
            if event is None:
                return
            batch = [event]
            deadline = time.monotonic() + BATCH_WAIT_S
            while (left := deadline - time.monotonic()) > 0:
                try:
                    following = self.events.get(timeout=left)
                except queue.Empty:
                    break
                if following is None:
                    self.events.put(None)
                    break
                batch.append(following)
            try:
                self.handle(batch)
            except Exception as exc:  # keep routing whatever one batch did
                orthanc.LogError(f"cxr-ai autoroute: {type(exc).__name__}: {exc}")

    def handle(self, batch: list[tuple[str, str]]) -> None:
        candidates: list[str] = []
        for kind, resource_id in batch:
            candidates += (
                [resource_id] if kind == "instance" else self.study_candidates(resource_id)
            )
        eligible = [i for i in dict.fromkeys(candidates) if self.eligible(i)]
        if eligible:
            self.forward(eligible)

    def study_candidates(self, study_id: str) -> list[str]:
        """Instances of the study's CR/DX series that are not the node's (one request for
        a CT study, not one per slice)."""
        found: list[str] = []
        for series in _get_json(f"/studies/{study_id}/series?expand") or []:
            main = series.get("MainDicomTags", {})
            if _text(main.get("Modality")) in FORWARD_MODALITIES and not node_made_it(main, None):
                found += series.get("Instances", [])
        return found

    def eligible(self, instance_id: str) -> bool:
        if instance_id in self.forwarded:
            return False
        metadata = _get_json(f"/instances/{instance_id}/metadata?expand")
        if metadata is None:  # deleted meanwhile
            return False
        if self.metadata and self.metadata in metadata:
            self.forwarded.add(instance_id)
            return False
        remote_aet = metadata.get("RemoteAET")
        if _text(remote_aet) == _text(NODE_AET):
            return False
        tags = _get_json(f"/instances/{instance_id}/simplified-tags")
        if tags is None:
            return False
        why = node_made_it(tags, remote_aet) or not_a_frontal_chest(tags)
        if why is not None:
            if VERBOSE:
                orthanc.LogWarning(f"cxr-ai autoroute: not forwarding {instance_id}: {why}")
            return False
        return True

    def forward(self, instance_ids: list[str]) -> None:
        for instance_id in instance_ids:
            self.remember(instance_id)
        body = {"Resources": instance_ids, "Asynchronous": True, "Permissive": True}
        job = json.loads(
            orthanc.RestApiPost(f"/modalities/{TARGET_MODALITY}/store", json.dumps(body))
        )
        orthanc.LogWarning(
            f"cxr-ai autoroute: forwarding {len(instance_ids)} instance(s) to "
            f"{TARGET_MODALITY} (job {job.get('ID')})"
        )

    def remember(self, instance_id: str) -> None:
        self.forwarded.add(instance_id)
        if not self.metadata:
            return
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        try:
            orthanc.RestApiPut(
                f"/instances/{instance_id}/metadata/{self.metadata}", f"{TARGET_MODALITY} {stamp}"
            )
        except orthanc.OrthancException:
            orthanc.LogWarning(
                f"cxr-ai autoroute: cannot set metadata {self.metadata} (declare it in "
                "UserMetadata); remembering in memory only"
            )
            self.metadata = None


ROUTER = Router()
ROUTER.thread.start()
orthanc.RegisterOnChangeCallback(ROUTER.on_change)
orthanc.LogWarning(
    f"cxr-ai autoroute: forwarding frontal chest radiographs to {TARGET_MODALITY} "
    f"({FORWARD_WHEN}), never what {NODE_AET} sends"
)
