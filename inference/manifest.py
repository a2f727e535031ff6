"""What a model bundle says about itself, readable without torch.

``configs/metadata.json`` names the model (name, version, role, thresholds) and carries
the sha256 of every model file. Reading it — and hashing the files against it — needs
only ``json`` and ``hashlib``; keeping that here, apart from :mod:`inference.bundle`
(which builds networks and therefore imports torch and MONAI), lets ``dicom-node status``
and ``dicom-node models …`` describe and check the models in milliseconds instead of
paying seconds of imports for networks they never run.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BUNDLES_DIR = Path(__file__).parent / "bundles"
SCREEN_BUNDLE = BUNDLES_DIR / "cxr_pneumonia_screen_mobilenetv3"
CONFIRM_BUNDLE = BUNDLES_DIR / "cxr_pneumonia_confirm_resnet18"
WEIGHTS = "models/model.pt"


def finding_bundle_path(finding: str, role: str) -> Path:
    """Where the shipped ``role`` ("screen" | "confirm") bundle of ``finding`` lies."""
    network = "mobilenetv3" if role == "screen" else "resnet18"
    return BUNDLES_DIR / f"cxr_{finding}_{role}_{network}"


SEGMENT_BUNDLE = BUNDLES_DIR / "cxr_anatomy_segment_unet"
MEASURED_FINDINGS = ("cardiomegaly",)
"""Findings derived from the anatomy measurements of the segment bundle, not from a
screen + confirm classifier pair (see :mod:`inference.cardiomegaly`)."""


def is_measured(finding: str) -> bool:
    return finding in MEASURED_FINDINGS


GATE = "models/gate.pt"
CHUNK = 1 << 20

Progress = Callable[[int], None]


class BundleError(Exception):
    """A bundle is missing, malformed or fails its integrity check."""


@dataclass(frozen=True)
class FileCheck:
    """One hashed file of a bundle against the digest its manifest expects."""

    relpath: str
    expected: str
    actual: str | None  # None: the file is missing
    size_bytes: int

    @property
    def ok(self) -> bool:
        return self.actual == self.expected


def sha256_file(path: Path, progress: Progress | None = None) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks; ``progress(n)`` after each chunk."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            digest.update(chunk)
            if progress is not None:
                progress(len(chunk))
    return digest.hexdigest()


def read_metadata(path: Path) -> dict[str, Any]:
    meta_file = path / "configs" / "metadata.json"
    if not meta_file.is_file():
        raise BundleError(f"{path}: not a model bundle (no configs/metadata.json)")
    try:
        meta: dict[str, Any] = json.loads(meta_file.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{meta_file}: invalid JSON ({exc})") from exc
    return meta


def hashed_files(path: Path, meta: dict[str, Any]) -> dict[str, str]:
    """``{relative path: expected sha256}``; a bundle must at least hash its weights."""
    expected: dict[str, str] = meta.get("sha256", {})
    if WEIGHTS not in expected:
        raise BundleError(f"{path}: metadata.json lists no sha256 for {WEIGHTS}")
    return expected


def check_files(
    path: Path, meta: dict[str, Any], progress: Progress | None = None
) -> Iterator[FileCheck]:
    """Hash every file the manifest lists, one :class:`FileCheck` each (never raises on
    a mismatch: the caller decides whether to refuse the bundle or report it)."""
    for rel, digest in hashed_files(path, meta).items():
        file = path / rel
        if not file.is_file():
            yield FileCheck(rel, digest, None, 0)
            continue
        yield FileCheck(rel, digest, sha256_file(file, progress), file.stat().st_size)


def verify(path: Path, meta: dict[str, Any] | None = None) -> dict[str, str]:
    """Check every hashed file of the bundle; return their digests or raise BundleError."""
    meta = meta if meta is not None else read_metadata(path)
    for check in check_files(path, meta):
        if check.actual is None:
            raise BundleError(f"{path}: {check.relpath} is missing")
        if not check.ok:
            raise BundleError(
                f"{path}: {check.relpath} fails its integrity check "
                f"(sha256 {check.actual[:12]}…, metadata.json expects {check.expected[:12]}…); "
                "refusing to load"
            )
    return hashed_files(path, meta)


def hashed_size(path: Path, meta: dict[str, Any]) -> int:
    """Bytes of the files the manifest hashes (what ``models verify`` will read)."""
    files = (path / rel for rel in meta.get("sha256", {}))
    return sum(file.stat().st_size for file in files if file.is_file())
