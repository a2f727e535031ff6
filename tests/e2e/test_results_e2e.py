"""End to end with Orthanc as the hospital archive: images in, SR + heatmap SC back.

Orthanc (the real Debian server, loopback, temporary configuration) knows the node as a
DICOM modality; the node knows Orthanc as its destination ``pacs``. The shared data's
real CR/DX files — chest and non-chest; their patients are adults, outside the pneumonia
model's population, so they are not scored — and NIH sample PNGs wrapped into DX DICOM
with their real sex and view and a child's age (inside it) are stored in Orthanc; Orthanc
then sends them to the node through its REST API (``/modalities/{id}/store``), exactly as
a PACS auto-routing rule would. ``dicom-node serve`` (a subprocess, real engine) analyses
them and sends its results back. The test then reads the archive:

* every image the engine scores has exactly one SR and one SC in its study, referencing
  it; every other image (non-chest, not scored) has none;
* the probabilities in the SRs, read back from Orthanc, are those ``dicom-node analyze``
  reports for the same files;
* every SR and SC passes ``dciodvfy`` with 0 errors;
* the outbox is empty, nothing dead-lettered, and delivered images left the spool.

A second test takes the destination away: the PACS is down while the node works, the
results wait in the outbox and arrive — exactly once — when it comes back.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import SegmentationStorage

from tests.dciodvfy import dciodvfy
from tests.e2e.orthanc import LOOPBACK, Modality, Orthanc, run_orthanc
from tests.nih_dicom import dx_dataset, pick, read_labels, write
from tests.support import NodeProcess, as_child, child_copy, free_port, run, storescu

NODE_MODALITY = "cxr-node"
SR_SERIES = "AI CXR findings"
SC_SERIES = "AI CXR heatmap"
SEG_SERIES = "AI CXR anatomy segmentation"
PROBABILITY_CODE = "122157"
WAIT_S = 600.0
TOLERANCE = 1.5e-6  # the SR holds the probability rounded to 6 decimals
pytestmark = [
    pytest.mark.timeout(1200),
    # The shared dental CR has a non-conformant SOP Instance UID; reading it is expected.
    pytest.mark.filterwarnings("ignore:Invalid value for VR UI"),
]


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.5)


def node_config(path: Path, orthanc_port: int, extra: str = "") -> Path:
    path.write_text(
        f"""
[[destinations]]
name = "pacs"
ae_title = "ORTHANC"
host = "{LOOPBACK}"
port = {orthanc_port}
timeout_s = 20

[retention]
keep_days = 0
interval = 1
{extra}"""
    )
    return path


def status(node: NodeProcess) -> dict[str, Any]:
    result = node.cli("status", "--json")
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def settled(node: NodeProcess, instances: int) -> bool:
    """Every received image finished and every send settled (sent or dead)."""
    report = status(node)
    jobs, sends = report["jobs"], report["sends"].get("pacs", {})
    finished = jobs["done"] + jobs["failed"] + jobs["skipped"]
    return (
        report["instances"]["total"] == instances
        and finished == instances
        and not sends.get("pending")
        and not sends.get("sending")
    )


# -- reading the archive --------------------------------------------------------------------


@dataclass(frozen=True)
class NodeOutput:
    """An SR or SC of the node as Orthanc holds it."""

    kind: str  # "sr" | "sc" | "seg"
    dataset: Dataset
    path: Path  # downloaded copy

    @property
    def source_uid(self) -> str:
        if self.kind == "sr":  # the evidence: the radiograph (and the SEG, when written)
            (study,) = self.dataset.CurrentRequestedProcedureEvidenceSequence
            (image,) = [
                image
                for series in study.ReferencedSeriesSequence
                for image in series.ReferencedSOPSequence
                if image.ReferencedSOPClassUID != SegmentationStorage
            ]
        elif self.kind == "sc":
            (image,) = self.dataset.SourceImageSequence
        else:  # the SEG: Common Instance Reference (PS3.3 C.12.2)
            (series,) = self.dataset.ReferencedSeriesSequence
            (image,) = series.ReferencedInstanceSequence
        return str(image.ReferencedSOPInstanceUID)


def node_outputs(orthanc: Orthanc, folder: Path) -> list[NodeOutput]:
    """Every SR, SC and SEG in Orthanc that the node made (recognised by its series)."""
    folder.mkdir(parents=True, exist_ok=True)
    found = []
    for kind, description in (("sr", SR_SERIES), ("sc", SC_SERIES), ("seg", SEG_SERIES)):
        for instance_id in orthanc.find("Instance", {"SeriesDescription": description}):
            path = folder / f"{instance_id}.dcm"
            path.write_bytes(orthanc.download(instance_id))
            found.append(NodeOutput(kind, pydicom.dcmread(path), path))
    return found


def probabilities(sr: Dataset) -> list[float]:
    """NUM (122157, DCM, "Probability") values anywhere in the SR content tree."""
    values: list[float] = []

    def walk(items: Any) -> None:
        for item in items:
            name = item.get("ConceptNameCodeSequence")
            if item.get("ValueType") == "NUM" and name and name[0].CodeValue == PROBABILITY_CODE:
                values.append(float(item.MeasuredValueSequence[0].NumericValue))
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    return values


def analyze(files: list[Path], cwd: Path) -> dict[str, dict[str, Any]]:
    """``dicom-node analyze --json`` on the files: the reference, by SOP Instance UID."""
    import sys

    result = run([sys.executable, "-m", "dicom_node", "analyze", "--json", *files], cwd=cwd)
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in result.stdout.splitlines()]
    return {record["sop_instance_uid"]: record for record in records}


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nih_files(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two PA and two AP NIH images as DX DICOM with their real sex and view, aged as a
    child so that the pneumonia model assesses them."""
    folder = tmp_path_factory.mktemp("nih-dx")
    images = pick(read_labels(data_dir / "nih-sample"), {"PA": 2, "AP": 2})
    return [
        write(as_child(dx_dataset(image)), folder / f"{image.path.stem}.dcm") for image in images
    ]


@pytest.fixture(scope="module")
def archive_run(
    image_files: list[Path],
    nih_files: list[Path],
    tmp_path_factory: pytest.TempPathFactory,
    dcmtk: None,
) -> Iterator[tuple[Orthanc, NodeProcess, Path]]:
    """Orthanc filled with the images, routed to a running node, results delivered."""
    work = tmp_path_factory.mktemp("archive")
    node_port = free_port()
    modalities = {NODE_MODALITY: Modality("CXR_AI", LOOPBACK, node_port)}
    with run_orthanc(work / "orthanc", modalities=modalities) as orthanc:
        for path in [*image_files, *nih_files]:
            orthanc.upload(path.read_bytes())
        held = orthanc.instances()
        config = node_config(work / "node.toml", orthanc.dicom_port)
        node = NodeProcess(
            home=work / "node",
            database_url=f"sqlite:///{work / 'node.db'}",
            port=node_port,
            config_file=config,
            workers=True,
        ).start()
        try:
            job = orthanc.store_to_modality(NODE_MODALITY, held)
            assert job["FailedInstancesCount"] == 0, job
            wait_for(lambda: settled(node, len(held)), WAIT_S, "the node to settle")
            yield orthanc, node, work
        finally:
            node.stop()


# -- tests ----------------------------------------------------------------------------------


def test_each_scored_image_has_one_sr_and_one_sc_in_its_study_and_others_none(
    archive_run: tuple[Orthanc, NodeProcess, Path],
) -> None:
    orthanc, node, work = archive_run
    sources = work / "sources"
    sources.mkdir()
    held: dict[str, Path] = {}
    for instance_id in orthanc.instances():
        tags = orthanc.get_instance_tags(instance_id)
        if tags.get("SeriesDescription") in (SR_SERIES, SC_SERIES, SEG_SERIES):
            continue
        path = sources / f"{instance_id}.dcm"
        path.write_bytes(orthanc.download(instance_id))
        held[tags["SOPInstanceUID"]] = path
    reference = analyze(sorted(held.values()), work)
    assert set(reference) == set(held)

    outputs = node_outputs(orthanc, work / "outputs")
    per_source: dict[str, list[str]] = {uid: [] for uid in held}
    for output in outputs:
        per_source[output.source_uid].append(output.kind)
    scored = {uid for uid, record in reference.items() if record["status"] == "scored"}
    for uid in held:
        # Adults whose anatomy was measured also get the SEG of heart and lungs.
        measured = ["seg"] if reference[uid]["measurements"] else []
        expected = sorted(["sc", "sr", *measured]) if uid in scored else []
        assert sorted(per_source[uid]) == expected, (uid, reference[uid]["status"])

    # The data's chest radiographs are scored, its hip, tibia, dental and dog are not.
    by_name = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in held.values()}
    non_chest = {"HIP", "EXTREMITY", "THORAX"}
    for uid, path in by_name.items():
        header = pydicom.dcmread(path, stop_before_pixels=True)
        if str(header.get("BodyPartExamined", "")) in non_chest or "TEETH" in str(
            header.get("StudyDescription", "")
        ):
            assert uid not in scored and per_source[uid] == []
    assert len(scored) >= 4, {uid: r["status"] for uid, r in reference.items()}

    for output in outputs:
        source = pydicom.dcmread(held[output.source_uid], stop_before_pixels=True)
        assert output.dataset.StudyInstanceUID == source.StudyInstanceUID
        assert output.dataset.SeriesInstanceUID != source.SeriesInstanceUID


def test_sr_probabilities_in_the_archive_equal_dicom_node_analyze(
    archive_run: tuple[Orthanc, NodeProcess, Path],
) -> None:
    orthanc, _, work = archive_run
    folder = work / "check-probabilities"
    folder.mkdir()
    outputs = [o for o in node_outputs(orthanc, folder / "out") if o.kind == "sr"]
    sources = {}
    for output in outputs:
        instance_id = orthanc.find_instance(output.source_uid)
        assert instance_id is not None
        path = folder / f"{instance_id}.dcm"
        path.write_bytes(orthanc.download(instance_id))
        sources[output.source_uid] = path
    reference = analyze(sorted(sources.values()), work)
    assert outputs
    for output in outputs:
        findings = reference[output.source_uid]["findings"]
        expected = [f["probability"] for f in findings if f["status"] == "assessed"]
        assert probabilities(output.dataset) == pytest.approx(expected, abs=TOLERANCE)


def test_every_sr_and_sc_in_the_archive_passes_dciodvfy(
    archive_run: tuple[Orthanc, NodeProcess, Path],
) -> None:
    orthanc, _, work = archive_run
    outputs = node_outputs(orthanc, work / "dciodvfy")
    assert outputs
    for output in outputs:
        report = dciodvfy(output.path)
        expected_iod = {"sr": "Comprehensive3DSR", "sc": "SCImage", "seg": "Segmentation"}[
            output.kind
        ]
        assert report.iod == expected_iod, report.output
        assert report.errors == [], report.output


def test_outbox_empty_nothing_dead_spool_purged_logs_clean(
    archive_run: tuple[Orthanc, NodeProcess, Path],
    nih_files: list[Path],
) -> None:
    _, node, _ = archive_run
    report = status(node)
    assert report["dead_letters"] == 0
    sends = report["sends"]["pacs"]
    assert sends["sent"] > 0
    # Two objects per scored image (SR, SC), three for an adult measured (and its SEG).
    assert report["results"]["scored"] * 2 <= sends["sent"] <= report["results"]["scored"] * 3
    objects = node.spool / "objects"

    def delivered_purged() -> bool:
        return report["jobs"]["failed"] == sum(1 for _ in objects.rglob("*.dcm"))

    wait_for(delivered_purged, 30, "retention to empty the spool of finished work")
    assert not any((node.spool / "outputs").rglob("*.dcm"))
    stderr = node.stderr()
    for path in nih_files:
        header = pydicom.dcmread(path, stop_before_pixels=True)
        assert str(header.PatientName) not in stderr and str(header.PatientID) not in stderr


def test_destination_down_results_delivered_once_when_it_returns(
    image_files: list[Path], nih_files: list[Path], tmp_path: Path, dcmtk: None
) -> None:
    work = tmp_path
    pacs_port = free_port()  # nothing listens here yet: the PACS is down
    extra = "[sender]\nbackoff_base = 0.2\nbackoff_cap = 1.0\n"
    node = NodeProcess(
        home=work / "node",
        database_url=f"sqlite:///{work / 'node.db'}",
        config_file=node_config(work / "node.toml", pacs_port, extra),
        workers=True,
    ).start()
    siim = next(p for p in image_files if p.name == "siim-cr-jpegbaseline.dcm")
    chest = [child_copy(siim, tmp_path / "siim-child.dcm"), *nih_files[:1]]
    try:
        for path in chest:
            assert storescu(node.port, path).returncode == 0

        def failing() -> bool:
            rows = json.loads(node.cli("sends", "list", "--json").stdout)
            return len(rows) == 4 and all(
                r["state"] == "pending" and r["attempts"] >= 2 for r in rows
            )

        wait_for(failing, WAIT_S, "the node to analyse and fail to reach the PACS")
        with run_orthanc(work / "orthanc", dicom_port=pacs_port) as orthanc:
            wait_for(lambda: settled(node, len(chest)), 120, "delivery after the PACS returned")
            outputs = node_outputs(orthanc, work / "outputs")
            sources = [
                str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in chest
            ]
            assert sorted(o.source_uid for o in outputs if o.kind == "sr") == sorted(sources)
            assert sorted(o.source_uid for o in outputs if o.kind == "sc") == sorted(sources)
        rows = json.loads(node.cli("sends", "list", "--json").stdout)
        assert len(rows) == 4 and {r["state"] for r in rows} == {"sent"}
        sent_events = [e for e in node.log_events() if e.get("event") == "sends attempted"]
        assert sum(e["sent"] for e in sent_events) == 4  # each object stored exactly once
    finally:
        node.stop()
