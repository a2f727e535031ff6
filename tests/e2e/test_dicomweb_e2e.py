"""A real archive behind DICOMweb: Orthanc with its Debian DICOMweb plugin (STOW-RS).

* the node's SR, heatmap SC and Grad-CAM Parametric Map, and a source radiograph, are
  stored through the ``dicomweb`` destination and read back identical;
* the Parametric Map is also accepted over C-STORE by the ``dicom`` destination;
* an outage: Orthanc is stopped while the second request of a send is on the wire — the
  objects of that request and the next are retryable failures, the first request's are
  stored; once Orthanc is back (same address, same storage) the retry delivers the rest,
  and the archive holds every object exactly once.
"""

from __future__ import annotations

from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from dicom_node.dispatch import DicomDestination, SendOutcome, get_sender, parse_destination
from dicom_node.dispatch import dicomweb as dicomweb_module
from dicom_node.dispatch.dicomweb import send_objects
from dicom_node.results.heatmap_sc import heatmap_secondary_capture
from dicom_node.results.parametric_map import heatmap_parametric_map
from dicom_node.results.sr import measurement_report
from tests.e2e.orthanc import Orthanc, run_orthanc
from tests.results_data import RG1_UNCR, make_result, read_source, source_path

NODE_AET = "CXR_AI"


def dicomweb_destination(orthanc: Orthanc, **settings: object) -> object:
    table = {"name": "archive", "type": "dicomweb", "url": orthanc.dicomweb_url, **settings}
    return parse_destination(table)


def outputs(source: Dataset, variant: str | None = None) -> list[Dataset]:
    """The SR, SC and PM of one result (``variant`` gives them UIDs of their own)."""
    result = make_result(source)
    y, x = np.mgrid[0:16, 0:16]
    result.cam = np.exp(-((y - 9.0) ** 2 + (x - 5.0) ** 2) / 12.0).astype(np.float32)
    result.image_shape = (int(source.Rows), int(source.Columns))
    return [
        measurement_report(source, result, source_variant=variant),
        heatmap_secondary_capture(source, result, source_variant=variant),
        heatmap_parametric_map(source, result, source_variant=variant),
    ]


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    with run_orthanc(tmp_path_factory.mktemp("orthanc-dicomweb"), dicomweb=True) as server:
        yield server


def test_stow_rs_stores_every_output_and_the_source(orthanc: Orthanc) -> None:
    source = read_source(RG1_UNCR)
    objects: list[object] = [*outputs(source), source_path(RG1_UNCR)]
    outcomes = send_objects(dicomweb_destination(orthanc), objects)  # type: ignore[arg-type]
    assert all(o.success and not o.warning for o in outcomes), outcomes
    sr, sc, pm = objects[:3]
    assert isinstance(pm, Dataset)
    for ds in (sr, sc, pm):
        assert isinstance(ds, Dataset)
        instance = orthanc.find_instance(str(ds.SOPInstanceUID))
        assert instance, f"{ds.SOPClassUID.name} not stored"
        tags = orthanc.get_instance_tags(instance)
        assert tags["StudyInstanceUID"] == source.StudyInstanceUID
    stored = pydicom.dcmread(BytesIO(orthanc.download(orthanc.find_instance(pm.SOPInstanceUID))))
    assert stored.SOPClassUID == pm.SOPClassUID
    np.testing.assert_array_equal(stored.pixel_array, pm.pixel_array)
    assert orthanc.find_instance(str(source.SOPInstanceUID))


def test_the_parametric_map_over_c_store(orthanc: Orthanc) -> None:
    source = read_source("siim-cr-jpegbaseline.dcm")
    pm = outputs(source)[2]
    target = DicomDestination(
        name="pacs", ae_title=orthanc.aet, host=orthanc.host, port=orthanc.dicom_port
    )
    (outcome,) = get_sender("dicom").send(target, [pm], NODE_AET)
    assert outcome.success and outcome.status == 0x0000, outcome
    assert orthanc.find_instance(str(pm.SOPInstanceUID))


def test_an_outage_mid_batch_is_retried_and_delivered_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = read_source(RG1_UNCR)
    objects = [ds for i in range(4) for ds in outputs(source, f"outage-{i}")]  # 12 objects
    uids = [str(ds.SOPInstanceUID) for ds in objects]
    workdir = tmp_path / "orthanc"
    with run_orthanc(workdir, dicomweb=True) as first:
        ports = {"http_port": first.http_port, "dicom_port": first.dicom_port}
        destination = dicomweb_destination(first, batch_size=5, timeout_s=10)
        bodies = 0
        original = dicomweb_module._Body.__iter__

        def stop_during_the_second_request(body: dicomweb_module._Body) -> Iterator[bytes]:
            nonlocal bodies
            bodies += 1
            for number, chunk in enumerate(original(body)):
                if bodies == 2 and number == 2:  # head and part of the first object sent
                    assert first.process is not None
                    first.process.terminate()
                    first.process.wait(timeout=30)
                yield chunk

        monkeypatch.setattr(dicomweb_module._Body, "__iter__", stop_during_the_second_request)
        outcomes = send_objects(destination, objects)  # type: ignore[arg-type]
        monkeypatch.undo()
    assert [o.success for o in outcomes] == [True] * 5 + [False] * 7
    assert all(o.retryable for o in outcomes[5:])
    assert {o.category for o in outcomes[5:]} <= {"aborted", "connection", "timeout"}

    with run_orthanc(workdir, dicomweb=True, **ports) as again:
        assert again.dicomweb_url == first.dicomweb_url
        # What the outbox does: the retryable failures again, the delivered ones not.
        retry = [(i, ds) for i, (ds, o) in enumerate(zip(objects, outcomes, strict=True))]
        pending = [ds for i, ds in retry if not outcomes[i].success]
        second: list[SendOutcome] = send_objects(destination, pending)  # type: ignore[arg-type]
        assert all(o.success for o in second), second
        stored = {str(again.get_instance_tags(i)["SOPInstanceUID"]) for i in again.instances()}
        assert len(again.instances()) == len(uids) and stored == set(uids)
