"""The PACS routing scripts of ``deploy/pacs/orthanc/`` against a real Orthanc and node.

Orthanc (the Debian server, loopback, temporary configuration built from the shipped
``orthanc.json`` snippet) runs the shipped router — ``autoroute.lua``, or
``autoroute.py`` under the Python plugin — with the node registered as the modality
``cxr-ai-node``; ``dicom-node serve`` (real engine) has Orthanc as its destination
``pacs``. dcmtk ``storescu`` stores a mix of objects in Orthanc, one association each,
as modalities do: frontal chest radiographs (CR, DX, chest Secondary Captures, one known
as a chest only by its description), a lateral of one of those studies, non-chest images
(hip, tibia, dental) and an SR. The tests read the node's database and Orthanc:

* the node receives exactly the frontal chests, once each;
* its SRs and SCs come back into Orthanc;
* nothing the node wrote is forwarded back to it — neither what it sent nor a copy of
  its heatmap re-stored by another AE — and studies becoming stable again (the results
  arriving, a late image) forward nothing twice.

``bench/bench_routing.py`` runs the same set-up on a burst of 100 images.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pydicom
import pytest
from pydicom.uid import generate_uid

from tests.e2e.orthanc import (
    LOOPBACK,
    ORTHANC_BINARY,
    Orthanc,
    OrthancError,
    configuration,
)
from tests.kermany_dicom import kermany_chests
from tests.nih_dicom import dx_dataset, pick, read_labels
from tests.support import NodeProcess, free_port, storescu
from tests.test_pacs_configs import ORTHANC_DIR, orthanc_json

TARGET = "cxr-ai-node"  # the modality name in the shipped scripts and snippet
NODE_AET = "CXR_AI"
PYTHON_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancPython.so")
SR_SERIES = "AI CXR findings"
SC_SERIES = "AI CXR heatmap"
SEG_SERIES = "AI CXR anatomy segmentation"
STABLE_AGE_S = 1
WAIT_S = 100.0
Variant = Literal["lua", "python"]
pytestmark = [
    pytest.mark.timeout(300),
    # The shared dental CR has a non-conformant SOP Instance UID; reading it is expected.
    pytest.mark.filterwarnings("ignore:Invalid value for VR UI"),
]


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.25)


# -- Orthanc with a router -------------------------------------------------------------


def install_script(folder: Path, variant: Variant, forward_when: str) -> Path:
    """A copy of the shipped router with ``FORWARD_WHEN`` set (nothing else changed)."""
    source = ORTHANC_DIR / ("autoroute.lua" if variant == "lua" else "autoroute.py")
    text = source.read_text()
    changed = re.sub(
        r'^FORWARD_WHEN = "instance"', f'FORWARD_WHEN = "{forward_when}"', text, count=1, flags=re.M
    )
    assert forward_when == "instance" or changed != text, "FORWARD_WHEN not found in the script"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / source.name
    target.write_text(changed)
    return target


def router_configuration(
    workdir: Path,
    variant: Variant,
    node_port: int,
    dicom_port: int,
    http_port: int,
    forward_when: str,
) -> dict[str, Any]:
    """The test server's configuration with the shipped snippet's keys merged in: the
    node's modality entry (pointed at the test node), the metadata, the script."""
    config = configuration(workdir, "ORTHANC", dicom_port, http_port, {})
    snippet = orthanc_json()
    modality = dict(snippet["DicomModalities"][TARGET], Host=LOOPBACK, Port=node_port)
    config["DicomModalities"] = {TARGET: modality}
    config["UserMetadata"] = snippet["UserMetadata"]
    config["StableAge"] = STABLE_AGE_S
    config["ConcurrentJobs"] = 2
    script = install_script(workdir / "scripts", variant, forward_when)
    if variant == "lua":
        config["LuaScripts"] = [str(script)]
    else:
        if not PYTHON_PLUGIN.exists():
            pytest.fail(f"Orthanc's Python plugin missing at {PYTHON_PLUGIN} (orthanc-python)")
        config["Plugins"] = [str(PYTHON_PLUGIN)]
        config["PythonScript"] = str(script)
    return config


@contextlib.contextmanager
def routing_orthanc(
    workdir: Path, variant: Variant, node_port: int, forward_when: str = "instance"
) -> Iterator[Orthanc]:
    """A running Orthanc with the router, stopped afterwards whatever happens."""
    if not Path(ORTHANC_BINARY).is_file():
        pytest.fail(f"Orthanc not installed at {ORTHANC_BINARY} (Debian package orthanc)")
    workdir.mkdir(parents=True, exist_ok=True)
    failure: Exception | None = None
    for _ in range(3):  # a free port can be taken before Orthanc binds it
        dicom_port, http_port = free_port(), free_port()
        config = router_configuration(
            workdir, variant, node_port, dicom_port, http_port, forward_when
        )
        path = workdir / f"orthanc-{http_port}.json"
        path.write_text(json.dumps(config, indent=2))
        server = Orthanc("ORTHANC", dicom_port, http_port, workdir / f"orthanc-{http_port}.log")
        setpriv = shutil.which("setpriv")
        wrapper = [setpriv, "--pdeathsig", "TERM", "--"] if setpriv else []
        with server.log.open("wb") as log:
            process = subprocess.Popen(
                [*wrapper, ORTHANC_BINARY, str(path)],
                cwd=workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        server.process = process
        try:
            server.wait_until_ready(process, 90)
        except OrthancError as exc:
            _stop(process)
            failure = exc
            continue
        try:
            yield server
        finally:
            _stop(process)
        return
    raise OrthancError(f"Orthanc with the router failed to start: {failure}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=20)


def forward_log_lines(orthanc: Orthanc) -> list[str]:
    return [
        line
        for line in orthanc.log.read_text(errors="replace").splitlines()
        if "cxr-ai autoroute: forwarding" in line
        and " to " in line
        and "frontal chest radiographs" not in line
    ]


# -- the node -----------------------------------------------------------------------------


@dataclass
class RoutedSite:
    """Orthanc with the router, and the node it routes to (results back to Orthanc)."""

    orthanc: Orthanc
    node: NodeProcess
    database_url: str

    def sql(self, query: str) -> list[tuple[Any, ...]]:
        from sqlalchemy import create_engine, text

        engine = create_engine(self.database_url)
        try:
            with engine.connect() as conn:
                return [tuple(row) for row in conn.execute(text(query))]
        finally:
            engine.dispose()

    def received(self) -> list[str]:
        """SOP Instance UIDs the node stored, one entry per stored version."""
        return [row[0] for row in self.sql("SELECT sop_instance_uid FROM instances")]

    def settled(self) -> bool:
        """Every job finished and every send acknowledged or dead."""
        (busy,) = self.sql(
            "SELECT (SELECT COUNT(*) FROM jobs WHERE state NOT IN ('done', 'failed', 'skipped'))"
            " + (SELECT COUNT(*) FROM sends WHERE state IN ('pending', 'sending'))"
        )[0]
        return int(busy) == 0

    def scored(self) -> set[str]:
        rows = self.sql(
            "SELECT i.sop_instance_uid FROM results r JOIN instances i ON r.instance_id = i.id"
            " WHERE r.status = 'scored'"
        )
        return {row[0] for row in rows}

    def outputs_sent(self) -> set[str]:
        """SOP Instance UIDs of the SRs and SCs the PACS acknowledged."""
        return {
            row[0] for row in self.sql("SELECT sop_instance_uid FROM sends WHERE state = 'sent'")
        }

    def orthanc_jobs_idle(self) -> bool:
        jobs = self.orthanc.request("GET", "/jobs?expand")
        return all(job["State"] in ("Success", "Failure") for job in jobs)

    def node_series_in_orthanc(self, description: str) -> list[dict[str, Any]]:
        found = self.orthanc.find("Instance", {"SeriesDescription": description}, expand=True)
        return [dict(item) for item in found]

    def wait_quiet(self, expected_received: int) -> None:
        """Until the node received ``expected_received`` objects, finished them, delivered
        its results, and Orthanc has let the studies become stable again (its router ran
        once more over every study) with no job left."""
        wait_for(lambda: len(self.received()) >= expected_received, WAIT_S, "forwarded images")
        wait_for(self.settled, WAIT_S, "the node to analyse and deliver")
        time.sleep(STABLE_AGE_S * 3 + 1)  # the result-bearing studies become stable again
        wait_for(self.orthanc_jobs_idle, WAIT_S, "Orthanc's jobs")


def node_config(path: Path, orthanc: Orthanc) -> Path:
    path.write_text(
        f"""
[[destinations]]
name = "pacs"
ae_title = "{orthanc.aet}"
host = "{LOOPBACK}"
port = {orthanc.dicom_port}
timeout_s = 20

[retention]
enabled = false
"""
    )
    return path


@contextlib.contextmanager
def routed_site(
    work: Path, variant: Variant, forward_when: str = "instance"
) -> Iterator[RoutedSite]:
    node_port = free_port()
    database_url = f"sqlite:///{work / 'node.db'}"
    with routing_orthanc(work / "orthanc", variant, node_port, forward_when) as orthanc:
        node = NodeProcess(
            home=work / "node",
            database_url=database_url,
            port=node_port,
            config_file=node_config(work / "node.toml", orthanc),
            workers=True,
        ).start()
        try:
            echo = orthanc.request("POST", f"/modalities/{TARGET}/echo", {})
            assert echo == {} or echo is None, echo
            yield RoutedSite(orthanc, node, database_url)
        finally:
            node.stop()


# -- test images -----------------------------------------------------------------------------


@dataclass
class RoutedImage:
    path: Path
    kind: Literal["frontal", "lateral", "non-chest", "sr"]
    sop_instance_uid: str = field(init=False)

    def __post_init__(self) -> None:
        header = pydicom.dcmread(self.path, stop_before_pixels=True)
        self.sop_instance_uid = str(header.SOPInstanceUID)


def fresh_copy(source: Path, target: Path, *, study: str | None = None, **changes: Any) -> Path:
    """``source`` as a new acquisition (fresh UIDs; ``study`` joins an existing study),
    with attributes changed (``None`` removes one). The pixel data stay as encoded."""
    ds = pydicom.dcmread(source)
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    for keyword, value in changes.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    target.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(target, enforce_file_format=True)
    return target


def nih_chests(
    data_dir: Path, folder: Path, count: int, offset: int = 0, *, youngest_first: bool = False
) -> list[Path]:
    """NIH sample images as DX CHEST PA/AP with their real age, sex and view, each with
    fresh UIDs (its own study); by name, or the youngest patients first (a model
    validated for children only scores those)."""
    images = pick(read_labels(data_dir / "nih-sample"), {"PA": 60, "AP": 60})
    if youngest_first:
        images.sort(key=lambda image: image.age)
    images = images[offset : offset + count] if offset + count <= len(images) else images
    paths = []
    for index in range(count):
        image = images[index % len(images)]
        ds = dx_dataset(image)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SOPInstanceUID = generate_uid()
        path = folder / f"nih-{'young-' if youngest_first else ''}{index:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def mixed_set(data_dir: Path, folder: Path) -> list[RoutedImage]:
    """Eleven objects: six frontal chests (adults and a child), a lateral of one of their
    studies, three non-chest images and an SR, all as new acquisitions."""
    dicom = data_dir / "dicom"
    folder.mkdir(parents=True, exist_ok=True)
    rg1 = fresh_copy(dicom / "rg1-chest-cr-mono1-j2k.dcm", folder / "rg1-pa.dcm")
    rg1_study = str(pydicom.dcmread(rg1, stop_before_pixels=True).StudyInstanceUID)
    images = [
        RoutedImage(rg1, "frontal"),
        RoutedImage(
            fresh_copy(dicom / "siim-cr-jpegbaseline.dcm", folder / "siim-sc.dcm"), "frontal"
        ),
        # A chest known only by its study description (no Body Part Examined).
        RoutedImage(
            fresh_copy(
                dicom / "nih-00000001_000-dx-sc.dcm",
                folder / "nih-sc.dcm",
                StudyDescription="XR CHEST PA",
                BodyPartExamined=None,
            ),
            "frontal",
        ),
        *(RoutedImage(p, "frontal") for p in nih_chests(data_dir, folder, 2)),
        # A child's radiograph too: whatever ages the node's models are validated for,
        # some frontal chest here is scored and its results come back.
        *(RoutedImage(p, "frontal") for p in kermany_chests(data_dir, folder, 1)),
        RoutedImage(
            fresh_copy(
                dicom / "rg1-chest-cr-mono1-j2k.dcm",
                folder / "rg1-ll.dcm",
                study=rg1_study,
                ViewPosition="LL",
                SeriesNumber=2,
            ),
            "lateral",
        ),
        RoutedImage(
            fresh_copy(dicom / "rg2-hip-cr-jpeglossless.dcm", folder / "hip.dcm"), "non-chest"
        ),
        RoutedImage(
            fresh_copy(dicom / "rg3-tibia-cr-j2k-lossless.dcm", folder / "tibia.dcm"), "non-chest"
        ),
        RoutedImage(
            fresh_copy(dicom / "dental-cr-modality-lut-jpeglossless.dcm", folder / "dental.dcm"),
            "non-chest",
        ),
        RoutedImage(fresh_copy(dicom / "example-tid1500-sr.dcm", folder / "sr.dcm"), "sr"),
    ]
    return images


def store(orthanc: Orthanc, paths: Sequence[Path], calling_ae: str = "CR_ROOM_1") -> None:
    """dcmtk storescu into Orthanc, one association per file (like modalities)."""
    for path in paths:
        result = storescu(orthanc.dicom_port, path, calling_ae=calling_ae, called_ae=orthanc.aet)
        assert result.returncode == 0, result.stdout + result.stderr


def status_received(node: NodeProcess) -> int:
    result = node.cli("status", "--json", "--no-echo")
    return int(json.loads(result.stdout)["instances"]["total"])


# -- tests -----------------------------------------------------------------------------------


def check_routing(site: RoutedSite, images: list[RoutedImage], work: Path) -> None:
    """The assertions both routers must pass, after ``images`` were stored in Orthanc."""
    frontal = {i.sop_instance_uid for i in images if i.kind == "frontal"}
    site.wait_quiet(len(frontal))
    received = site.received()
    assert sorted(received) == sorted(frontal)  # exactly the frontal chests, once each
    assert status_received(site.node) == len(frontal)

    # The results came back into Orthanc: one SR and one SC per scored image, and the
    # SEG of heart and lungs for each adult whose anatomy was measured.
    scored = site.scored()
    assert scored, "no image was scored: nothing to come back"
    sent = site.outputs_sent()
    srs = site.node_series_in_orthanc(SR_SERIES)
    scs = site.node_series_in_orthanc(SC_SERIES)
    segs = site.node_series_in_orthanc(SEG_SERIES)
    assert len(srs) == len(scs) == len(scored)
    assert 0 < len(segs) <= len(scored)  # the adults among them (the child has none)
    assert len(sent) == 2 * len(scored) + len(segs)
    assert {i["MainDicomTags"]["SOPInstanceUID"] for i in srs + scs + segs} == sent

    # Nothing the node wrote went back to it: the results' arrival made their studies
    # stable again, and the sweep forwarded nothing.
    assert not set(received) & sent
    # The heatmap is Modality OT, which no router forwards. Filed as CR instead (the
    # builder's option for PACS that want it) it passes every image rule — Secondary
    # Capture, CR, Body Part CHEST — and only the node's marks keep it out: its calling
    # AE when the node stores it, its manufacturer and series when another AE re-stores
    # it (an archive migration, another router).
    heatmap = scs[0]["ID"]
    as_cr = pydicom.dcmread(io.BytesIO(site.orthanc.download(heatmap)))
    as_cr.Modality = "CR"
    site.orthanc.request("DELETE", f"/instances/{heatmap}")
    from_node = work / "heatmap-as-cr.dcm"
    as_cr.save_as(from_node, enforce_file_format=True)
    as_cr.SOPInstanceUID = as_cr.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    restored = work / "heatmap-as-cr-restored.dcm"
    as_cr.save_as(restored, enforce_file_format=True)
    store(site.orthanc, [from_node], calling_ae=NODE_AET)
    store(site.orthanc, [restored], calling_ae="MIGRATION")
    time.sleep(STABLE_AGE_S * 3 + 1)
    wait_for(site.orthanc_jobs_idle, WAIT_S, "Orthanc's jobs")
    assert sorted(site.received()) == sorted(frontal)


def test_lua_router_forwards_each_frontal_chest_once_and_never_the_nodes_results(
    data_dir: Path, tmp_path: Path, dcmtk: None
) -> None:
    images = mixed_set(data_dir, tmp_path / "images")
    with routed_site(tmp_path, "lua") as site:
        store(site.orthanc, [i.path for i in images])
        check_routing(site, images, tmp_path)
        assert len(forward_log_lines(site.orthanc)) == sum(i.kind == "frontal" for i in images)
        # Each forwarded image is marked in Orthanc's metadata (survives restarts).
        for image in images:
            instance = site.orthanc.find_instance(image.sop_instance_uid)
            assert instance is not None
            metadata = site.orthanc.request("GET", f"/instances/{instance}/metadata?expand")
            marked = str(metadata.get("CxrAiForwarded", "")).startswith(TARGET)
            assert marked == (image.kind == "frontal"), (image.path.name, metadata)

        # A late frontal image into a study that was stable (and has results): forwarded
        # alone, the study's earlier images not again.
        rg1 = next(i for i in images if i.path.name == "rg1-pa.dcm")
        study = str(pydicom.dcmread(rg1.path, stop_before_pixels=True).StudyInstanceUID)
        late = fresh_copy(
            data_dir / "dicom" / "siim-cr-jpegbaseline.dcm", tmp_path / "late.dcm", study=study
        )
        store(site.orthanc, [late])
        frontal = {i.sop_instance_uid for i in images if i.kind == "frontal"}
        late_uid = str(pydicom.dcmread(late, stop_before_pixels=True).SOPInstanceUID)
        site.wait_quiet(len(frontal) + 1)
        assert sorted(site.received()) == sorted(frontal | {late_uid})


def test_python_router_forwards_stable_studies_once_even_when_they_become_stable_again(
    data_dir: Path, tmp_path: Path, dcmtk: None
) -> None:
    images = mixed_set(data_dir, tmp_path / "images")
    with routed_site(tmp_path, "python", forward_when="stable-study") as site:
        store(site.orthanc, [i.path for i in images])
        check_routing(site, images, tmp_path)
        forwards = forward_log_lines(site.orthanc)
        assert forwards, site.orthanc.log_tail()

        # The study with the lateral gets a late frontal: it becomes stable once more and
        # only the new image goes to the node.
        lateral = next(i for i in images if i.kind == "lateral")
        study = str(pydicom.dcmread(lateral.path, stop_before_pixels=True).StudyInstanceUID)
        late = fresh_copy(
            data_dir / "dicom" / "siim-cr-jpegbaseline.dcm", tmp_path / "late.dcm", study=study
        )
        store(site.orthanc, [late])
        frontal = {i.sop_instance_uid for i in images if i.kind == "frontal"}
        late_uid = str(pydicom.dcmread(late, stop_before_pixels=True).SOPInstanceUID)
        site.wait_quiet(len(frontal) + 1)
        assert sorted(site.received()) == sorted(frontal | {late_uid})
