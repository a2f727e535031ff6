"""Model bundles in the MONAI bundle layout, verified before use.

A bundle is a folder::

    configs/metadata.json   version, changelog, labels (SNOMED CT), thresholds,
                            calibration, input spec, sha256 of every model file
    configs/inference.json  ``network_def`` in MONAI's config syntax
    models/model.pt         fp16 state dict
    models/gate.pt          (screen bundles) feature statistics of the input gate
    docs/README.md          the model card

Every file named in ``metadata.json["sha256"]`` is hashed at load; a bundle whose weights
do not match is refused, because a silently swapped model in a clinical pipeline is worse
than no model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigParser
from torch import nn

# The manifest side (paths, metadata, sha256 checks) needs no torch; see manifest.py.
from inference.manifest import (
    BUNDLES_DIR,
    CONFIRM_BUNDLE,
    GATE,
    SCREEN_BUNDLE,
    WEIGHTS,
    BundleError,
    read_metadata,
    sha256_file,
    verify,
)

__all__ = [
    "BUNDLES_DIR",
    "CONFIRM_BUNDLE",
    "GATE",
    "SCREEN_BUNDLE",
    "WEIGHTS",
    "Bundle",
    "BundleError",
    "Calibration",
    "Label",
    "build_network",
    "network_data_format",
    "load_bundle",
    "read_metadata",
    "replace_gate",
    "sha256_file",
    "verify",
    "write_bundle",
]


@dataclass(frozen=True)
class Label:
    """One finding the network scores, with its coded concept (e.g. SCT 233604007)."""

    name: str
    code: str
    scheme: str
    meaning: str


@dataclass(frozen=True)
class Calibration:
    """``p = sigmoid((logit + logit_offset) / temperature)``.

    The offset undoes the class re-weighting used in training (log of the positive
    weight); the temperature is fitted on validation (Guo et al. 2017).
    """

    temperature: float = 1.0
    logit_offset: float = 0.0

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid((logits.float() + self.logit_offset) / self.temperature)


@dataclass
class Bundle:
    path: Path
    name: str
    version: str
    role: str  # "screen" | "confirm"
    metadata: dict[str, Any]
    network: nn.Module
    labels: list[Label]
    thresholds: dict[str, float]
    calibration: Calibration
    sha256: str  # of the weights file: the model's identity in results and logs
    input_size: int
    gate: dict[str, torch.Tensor] = field(default_factory=dict)

    def identity(self) -> str:
        return f"{self.name} {self.version}"


def load_bundle(path: Path, threshold_overrides: dict[str, float] | None = None) -> Bundle:
    """Verify, then build the network in eval mode with fp32 weights."""
    path = Path(path)
    meta = read_metadata(path)
    digests = verify(path, meta)
    network = _build_network(path)
    state = torch.load(path / WEIGHTS, map_location="cpu", weights_only=True)
    network.load_state_dict({k: v.float() for k, v in state.items()})
    network.eval()
    gate_file = path / GATE
    gate = (
        torch.load(gate_file, map_location="cpu", weights_only=True) if gate_file.is_file() else {}
    )
    thresholds = {**meta["thresholds"], **(threshold_overrides or {})}
    return Bundle(
        path=path,
        name=meta["name"],
        version=meta["version"],
        role=meta["role"],
        metadata=meta,
        network=network,
        labels=[Label(**lab) for lab in meta["labels"]],
        thresholds={k: float(v) for k, v in thresholds.items()},
        calibration=Calibration(**meta["calibration"]),
        sha256=digests[WEIGHTS],
        input_size=int(meta["network_data_format"]["inputs"]["image"]["spatial_shape"][0]),
        gate=gate,
    )


def _build_network(path: Path) -> nn.Module:
    config = path / "configs" / "inference.json"
    if not config.is_file():
        raise BundleError(f"{path}: configs/inference.json is missing")
    return build_network(json.loads(config.read_text())["network_def"], str(config))


def build_network(network_def: dict[str, Any], source: str = "network_def") -> nn.Module:
    """Instantiate a MONAI-config ``network_def``: training and loading share it, so the
    shipped definition is exactly the one that was trained."""
    network = ConfigParser({"network_def": network_def}).get_parsed_content("network_def")
    if not isinstance(network, nn.Module):
        raise BundleError(f"{source}: network_def is not a torch module")
    return network


def network_data_format(
    size: int, label: str, outputs: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The bundle's input and output spec: one grey channel at ``size``², one logit named
    ``label`` — or the ``outputs`` given (a segmentation's channels)."""
    return {
        "inputs": {
            "image": {
                "type": "image",
                "format": "magnitude",
                "modality": "xray",
                "num_channels": 1,
                "spatial_shape": [size, size],
                "dtype": "float32",
                "value_range": ["per-image standardised after 1-99 percentile stretch"],
                "is_patch_data": False,
                "channel_def": {"0": "image"},
            }
        },
        "outputs": outputs
        or {
            "pred": {
                "type": "logits",
                "format": "classification",
                "num_channels": 1,
                "spatial_shape": [1],
                "dtype": "float32",
                "value_range": [],
                "is_patch_data": False,
                "channel_def": {"0": label},
            }
        },
    }


def write_bundle(
    path: Path,
    metadata: dict[str, Any],
    network_def: dict[str, Any],
    state_dict: dict[str, torch.Tensor],
    model_card: str,
    gate: dict[str, torch.Tensor] | None = None,
    gate_info: dict[str, Any] | None = None,
) -> None:
    """Write a bundle with fp16 weights and the sha256 of every model file."""
    (path / "configs").mkdir(parents=True, exist_ok=True)
    (path / "models").mkdir(exist_ok=True)
    (path / "docs").mkdir(exist_ok=True)
    half = {k: v.half() if v.is_floating_point() else v for k, v in state_dict.items()}
    torch.save(half, path / WEIGHTS)
    hashed = {WEIGHTS: sha256_file(path / WEIGHTS)}
    if gate is not None:
        torch.save(gate, path / GATE)
        hashed[GATE] = sha256_file(path / GATE)
    metadata = {**metadata, "sha256": hashed, **({"gate": gate_info} if gate_info else {})}
    (path / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    (path / "configs" / "inference.json").write_text(
        json.dumps({"network_def": network_def}, indent=2) + "\n"
    )
    (path / "docs" / "README.md").write_text(model_card)


def replace_gate(path: Path, gate: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    """Swap the gate statistics of an existing bundle and re-hash them."""
    meta = read_metadata(path)
    verify(path, meta)
    torch.save(gate, path / GATE)
    meta["sha256"][GATE] = sha256_file(path / GATE)
    meta["gate"] = info
    (path / "configs" / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
