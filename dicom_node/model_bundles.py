"""The model bundles this configuration runs, described from their manifests alone.

``status`` and ``dicom-node models list`` report name, version, role, the thresholds in
force (the bundle's validated ones, overridden by ``[inference]``), the weights' sha256
as the manifest declares it and the size of the hashed files — without loading a
network, so neither imports torch. ``dicom-node models verify`` re-hashes the files
(:func:`inference.manifest.check_files`): the engine does the same at every load.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicom_node.config import Settings
from inference.manifest import (
    SEGMENT_BUNDLE,
    WEIGHTS,
    BundleError,
    finding_bundle_path,
    hashed_size,
    is_measured,
    read_metadata,
)


@dataclass(frozen=True)
class ConfiguredBundle:
    """One bundle slot of the cascade: its finding, role, where it lies, the override."""

    role: str  # "screen" | "confirm" | "segment"
    path: Path
    threshold_override: float | None
    finding: str = "pneumonia"


def configured_bundles(settings: Settings) -> list[ConfiguredBundle]:
    """Screen then confirm of each classifier finding in force, as ``[inference]`` sets
    them (default: the shipped bundles; paths and threshold overrides apply to the first
    finding), then the segmentation when the anatomy or a measured finding is on."""
    inference = settings.inference
    slots = []
    classified = [f for f in inference.findings if not is_measured(f)]
    for n, finding in enumerate(classified):
        first = n == 0
        slots += [
            ConfiguredBundle(
                "screen",
                (first and inference.screen_bundle) or finding_bundle_path(finding, "screen"),
                inference.screen_threshold if first else None,
                finding,
            ),
            ConfiguredBundle(
                "confirm",
                (first and inference.confirm_bundle) or finding_bundle_path(finding, "confirm"),
                inference.confirm_threshold if first else None,
                finding,
            ),
        ]
    measured = [f for f in inference.findings if is_measured(f)]
    if inference.anatomy or measured:
        path = inference.segment_bundle or SEGMENT_BUNDLE
        slots.append(ConfiguredBundle("segment", path, None, "+".join(["anatomy", *measured])))
    return slots


def describe(bundle: ConfiguredBundle) -> dict[str, Any]:
    """JSON-ready description; ``error`` says why a bundle cannot be read."""
    entry: dict[str, Any] = {
        "finding": bundle.finding,
        "role": bundle.role,
        "path": str(bundle.path),
        "name": None,
        "version": None,
        "sha256": None,
        "thresholds": {},
        "size_bytes": None,
        "error": None,
    }
    try:
        meta = read_metadata(bundle.path)
    except BundleError as exc:
        entry["error"] = str(exc)
        return entry
    thresholds = {name: float(value) for name, value in meta.get("thresholds", {}).items()}
    if bundle.threshold_override is not None:  # as InferenceSettings.cascade_kwargs does
        thresholds = {**thresholds, bundle.finding: bundle.threshold_override}
    entry.update(
        {
            "name": meta.get("name"),
            "version": meta.get("version"),
            "sha256": meta.get("sha256", {}).get(WEIGHTS),
            "thresholds": thresholds,
            "threshold_overridden": bundle.threshold_override is not None,
            "size_bytes": hashed_size(bundle.path, meta),
        }
    )
    if meta.get("role") not in (None, bundle.role):
        entry["error"] = f"bundle role is {meta['role']!r}, configured as {bundle.role!r}"
    return entry


def describe_all(settings: Settings) -> list[dict[str, Any]]:
    return [describe(bundle) for bundle in configured_bundles(settings)]
