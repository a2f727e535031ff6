"""A real PACS (Orthanc) accepts the SR and the heatmap SC and files them in the study.

The node sends like any modality: pynetdicom C-STORE SCU, one presentation context per
SOP class (Comprehensive 3D SR, Secondary Capture) with Explicit VR Little Endian. The
archive is then read back through Orthanc's REST API. Orthanc is also configured with a
small pynetdicom storage SCP standing in for the node, to show that results stored in the
PACS can be pushed on to a registered modality.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from io import BytesIO

import pydicom
import pytest
from highdicom.sc import SCImage
from highdicom.sr import Comprehensive3DSR
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    Comprehensive3DSRStorage,
    SecondaryCaptureImageStorage,
)
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.results.heatmap_sc import heatmap_secondary_capture
from dicom_node.results.sr import measurement_report
from tests.e2e.orthanc import LOOPBACK, Modality, Orthanc, orthanc  # noqa: F401
from tests.results_data import make_finding, make_result, read_source
from tests.support import free_port

NODE_AET = "CXR_AI"
SOURCES = ("rg1-chest-cr-mono1-j2k.dcm", "nih-00000001_000-dx-sc.dcm")
SUCCESS = 0x0000


class NodeSCP:
    """A storage SCP in the node's place: records every data set it receives."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.received: list[Dataset] = []
        self._lock = threading.Lock()
        ae = AE(ae_title=NODE_AET)
        for sop_class in (Comprehensive3DSRStorage, SecondaryCaptureImageStorage):
            ae.add_supported_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self._ae = ae
        self._server: ThreadedAssociationServer | None = None

    def _on_store(self, event: Event) -> int:
        with self._lock:
            self.received.append(event.dataset)
        return SUCCESS

    def start(self) -> None:
        self._server = self._ae.start_server(
            (LOOPBACK, self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()


@pytest.fixture(scope="module")
def node_scp() -> Iterator[NodeSCP]:
    scp = NodeSCP(free_port())
    scp.start()
    try:
        yield scp
    finally:
        scp.stop()


@pytest.fixture(scope="module")
def orthanc_modalities(node_scp: NodeSCP) -> dict[str, Modality]:
    """Overrides the Orthanc fixture's default: the node is a known DICOM peer."""
    return {"NODE": Modality(NODE_AET, LOOPBACK, node_scp.port)}


def _results(name: str) -> tuple[Dataset, Comprehensive3DSR, SCImage]:
    source = read_source(name)
    result = make_result(source, [make_finding(True, "confirm")])
    return source, measurement_report(source, result), heatmap_secondary_capture(source, result)


def c_store(orthanc: Orthanc, *datasets: Dataset) -> list[int]:  # noqa: F811
    """Send with pynetdicom as the node does; the DIMSE status of each C-STORE."""
    ae = AE(ae_title=NODE_AET)
    for sop_class in (Comprehensive3DSRStorage, SecondaryCaptureImageStorage):
        ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
    assoc = ae.associate(orthanc.host, orthanc.dicom_port, ae_title=orthanc.aet)
    assert assoc.is_established, "Orthanc refused the association"
    try:
        statuses = [assoc.send_c_store(ds) for ds in datasets]
    finally:
        assoc.release()
    assert all(status for status in statuses), "C-STORE got no response"
    return [int(status.Status) for status in statuses]


@pytest.mark.parametrize("name", SOURCES)
def test_orthanc_stores_sr_and_sc_in_the_source_study(
    orthanc: Orthanc,  # noqa: F811
    name: str,
) -> None:
    source, sr, sc = _results(name)
    assert c_store(orthanc, sr, sc) == [SUCCESS, SUCCESS]

    sr_id = orthanc.find_instance(sr.SOPInstanceUID)
    sc_id = orthanc.find_instance(sc.SOPInstanceUID)
    assert sr_id and sc_id
    sr_tags = orthanc.get_instance_tags(sr_id)
    sc_tags = orthanc.get_instance_tags(sc_id)
    assert sr_tags["StudyInstanceUID"] == sc_tags["StudyInstanceUID"] == source.StudyInstanceUID
    assert sr_tags["SOPClassUID"] == Comprehensive3DSRStorage
    assert sc_tags["SOPClassUID"] == SecondaryCaptureImageStorage
    assert sr_tags["Modality"] == "SR"
    assert sc_tags["Modality"] == "OT"  # see dicom_node.results.heatmap_sc
    assert sr_tags["SeriesInstanceUID"] != source.SeriesInstanceUID

    studies = orthanc.find("Study", {"StudyInstanceUID": source.StudyInstanceUID}, expand=True)
    assert len(studies) == 1 and len(studies[0]["Series"]) == 2

    stored = pydicom.dcmread(BytesIO(orthanc.download(sr_id)))
    assert stored.SOPInstanceUID == sr.SOPInstanceUID
    assert stored.ContentSequence == sr.ContentSequence


def test_resending_a_rebuilt_result_does_not_duplicate_it(orthanc: Orthanc) -> None:  # noqa: F811
    """A re-run job rebuilds identical UIDs; the archive still holds one copy."""
    _, sr, sc = _results("rg1-chest-cr-mono1-j2k.dcm")
    assert c_store(orthanc, sr, sc) == [SUCCESS, SUCCESS]
    before = set(orthanc.instances())
    _, sr_again, sc_again = _results("rg1-chest-cr-mono1-j2k.dcm")
    assert c_store(orthanc, sr_again, sc_again) == [SUCCESS, SUCCESS]
    assert set(orthanc.instances()) == before


def test_orthanc_forwards_results_to_a_registered_modality(
    orthanc: Orthanc,  # noqa: F811
    node_scp: NodeSCP,
) -> None:
    _, sr, sc = _results("rg1-chest-cr-mono1-j2k.dcm")
    assert c_store(orthanc, sr, sc) == [SUCCESS, SUCCESS]
    ids = [orthanc.find_instance(sr.SOPInstanceUID), orthanc.find_instance(sc.SOPInstanceUID)]
    job = orthanc.store_to_modality("NODE", [i for i in ids if i])
    assert job["InstancesCount"] == 2 and job["FailedInstancesCount"] == 0
    received = {str(ds.SOPInstanceUID) for ds in node_scp.received}
    assert {sr.SOPInstanceUID, sc.SOPInstanceUID} <= received
