"""Screen → confirm: the node's clinical decision for a batch of radiographs.

Every eligible image goes through the MobileNetV3 screen in one batched forward pass; the
screen's pooled features also feed the input gate (distance to training features, pixel
polarity). Images whose calibrated screen probability reaches the screen threshold (chosen
on validation for very high sensitivity) go through the ResNet confirm pass, again as one
batch. Each finding records which stage produced its probability, and Grad-CAM is computed
on the network that made that final call.

Nothing here raises for a bad image: each input gets an :class:`ImageResult` whose
``status`` is ``scored``, ``not_scored`` (with the gate's reason) or ``error``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydicom.dataset import Dataset

from inference import explain, gate
from inference.bundle import CONFIRM_BUNDLE, SCREEN_BUNDLE, Bundle, Label, load_bundle
from inference.decode import DecodedImage, DecodeError, decode
from inference.preprocess import inference_transforms, to_network_input

SCORED, NOT_SCORED, ERROR = "scored", "not_scored", "error"
POLARITY_FLIP = 0.5  # probe probability above which the image is taken as inverted


@dataclass(frozen=True)
class Finding:
    label: Label
    probability: float
    present: bool
    stage: str  # "screen" | "confirm"
    threshold: float
    model_name: str  # the bundle that made the call (TID 4019 Algorithm Name)
    model_version: str  # its version (TID 4019 Algorithm Version)

    def as_dict(self) -> dict[str, Any]:
        return {
            "code": self.label.code,
            "scheme": self.label.scheme,
            "meaning": self.label.meaning,
            "probability": round(self.probability, 6),
            "present": self.present,
            "stage": self.stage,
            "threshold": round(self.threshold, 6),
            "model": f"{self.model_name} {self.model_version}",
        }


@dataclass
class ImageResult:
    sop_instance_uid: str | None
    status: str
    reason: str = ""
    findings: list[Finding] = field(default_factory=list)
    in_domain: bool | None = None
    ood_distance: float | None = None
    warnings: list[str] = field(default_factory=list)
    cam: np.ndarray | None = None  # Grad-CAM map [0, 1] on the network's input grid
    overlay: np.ndarray | None = None  # uint8 RGB for the secondary capture
    spacing_mm: tuple[float, float] | None = None
    image_shape: tuple[int, int] | None = None  # rows × columns of the source
    timings_ms: dict[str, float] = field(default_factory=dict)

    @property
    def heatmap(self) -> np.ndarray | None:
        """The Grad-CAM map resampled onto the source's rows × columns (float32, [0, 1]).

        Computed on request: the node itself only sends the overlay, and a full-size map
        of a flat-panel image is 20 MB per image on the worker's hot path.
        """
        if self.cam is None or self.image_shape is None:
            return None
        return explain.to_original_grid(torch.as_tensor(self.cam), self.image_shape)

    def as_dict(self) -> dict[str, Any]:
        return {
            "sop_instance_uid": self.sop_instance_uid,
            "status": self.status,
            "reason": self.reason,
            "findings": [f.as_dict() for f in self.findings],
            "in_domain": self.in_domain,
            "ood_distance": None if self.ood_distance is None else round(self.ood_distance, 3),
            "warnings": self.warnings,
            "timings_ms": {k: round(v, 1) for k, v in self.timings_ms.items()},
        }


@dataclass
class _Item:
    """An image that passed the header gate and was decoded."""

    result: ImageResult
    image: DecodedImage
    tensor: torch.Tensor
    embedding: torch.Tensor | None = None  # pooled screen features (polarity probe)
    probes: list[torch.Tensor] | None = None  # probe-block statistics (distance gate)
    screen_prob: float = 0.0
    confirm_prob: float | None = None


class Cascade:
    """The loaded screen and confirm bundles plus the thresholds in force."""

    def __init__(
        self, screen: Bundle, confirm: Bundle, heatmaps: bool = True, device: str = "cpu"
    ) -> None:
        if screen.role != "screen" or confirm.role != "confirm":
            raise ValueError("bundles given in the wrong roles")
        self.screen = screen
        self.confirm = confirm
        self.heatmaps = heatmaps
        self.device = torch.device(device)
        screen.network.to(self.device)
        confirm.network.to(self.device)
        self.transforms = inference_transforms(screen.input_size)

    @classmethod
    def load(
        cls,
        screen_path: Path = SCREEN_BUNDLE,
        confirm_path: Path = CONFIRM_BUNDLE,
        screen_thresholds: dict[str, float] | None = None,
        confirm_thresholds: dict[str, float] | None = None,
        heatmaps: bool = True,
        device: str = "cpu",
    ) -> Cascade:
        return cls(
            load_bundle(screen_path, screen_thresholds),
            load_bundle(confirm_path, confirm_thresholds),
            heatmaps,
            device,
        )

    # -- public API ----------------------------------------------------------------------

    def analyze(self, datasets: Sequence[Dataset]) -> list[ImageResult]:
        """Results in input order; one batched forward pass per stage."""
        results: list[ImageResult] = []
        items: list[_Item] = []
        for ds in datasets:
            prepared = self._prepare(ds)
            if isinstance(prepared, _Item):
                items.append(prepared)
                results.append(prepared.result)
            else:
                results.append(prepared)
        if items:
            self._run(items)
        return results

    def analyze_pixels(
        self, images: Sequence[DecodedImage], uids: Sequence[str | None] | None = None
    ) -> list[ImageResult]:
        """The same decision for already decoded display images (no header gate).

        For callers that hold pixels rather than DICOM (evaluation on JPEG test sets,
        other front ends); the feature gate still applies.
        """
        uids = uids if uids is not None else [None] * len(images)
        items = [
            _Item(
                ImageResult(uid, SCORED, spacing_mm=image.spacing_mm),
                image,
                to_network_input(image.pixels, self.transforms),
            )
            for image, uid in zip(images, uids, strict=True)
        ]
        if items:
            self._run(items)
        return [it.result for it in items]

    # -- stages --------------------------------------------------------------------------

    def _prepare(self, ds: Dataset) -> _Item | ImageResult:
        uid = str(ds.get("SOPInstanceUID", "")) or None
        decision = gate.check_header(ds)
        if not decision.eligible:
            return ImageResult(uid, NOT_SCORED, decision.reason)
        start = time.perf_counter()
        try:
            image = decode(ds)
            tensor = to_network_input(image.pixels, self.transforms)
        except DecodeError as exc:
            return ImageResult(uid, ERROR, str(exc))
        except Exception as exc:  # noqa: BLE001 - a bad image must never escape as an exception
            return ImageResult(uid, ERROR, f"preprocessing failed: {type(exc).__name__}: {exc}")
        result = ImageResult(uid, SCORED, spacing_mm=image.spacing_mm)
        result.timings_ms["preprocess"] = (time.perf_counter() - start) * 1000
        return _Item(result, image, tensor)

    def _run(self, items: list[_Item]) -> None:
        self._screen(items)
        self._correct_polarity(items)
        scored = self._gate_features(items)
        confirm = [it for it in scored if it.screen_prob >= self._screen_threshold]
        self._confirm(confirm)
        for it in scored:
            it.result.findings = [self._finding(it)]
        if self.heatmaps:
            self._explain([it for it in scored if it.confirm_prob is None], self.screen)
            self._explain([it for it in scored if it.confirm_prob is not None], self.confirm)

    @property
    def _label(self) -> Label:
        return self.screen.labels[0]

    @property
    def _screen_threshold(self) -> float:
        return self.screen.thresholds[self._label.name]

    def _batch(self, items: list[_Item]) -> torch.Tensor:
        return torch.stack([it.tensor for it in items]).to(self.device)

    def _screen(self, items: list[_Item]) -> None:
        start = time.perf_counter()
        batch = self._batch(items)
        net = self.screen.network
        with torch.inference_mode():
            embedding, probe = net.embed_and_probe(batch)  # type: ignore[operator]
            logits = net.head(embedding).squeeze(1)  # type: ignore[operator]
        probs = self.screen.calibration.apply(logits).tolist()
        embedding, probe = embedding.cpu(), [p.cpu() for p in probe]
        elapsed = (time.perf_counter() - start) * 1000 / len(items)
        for i, (it, prob) in enumerate(zip(items, probs, strict=True)):
            it.embedding, it.screen_prob = embedding[i], float(prob)
            it.probes = [p[i] for p in probe]
            it.result.timings_ms["screen"] = it.result.timings_ms.get("screen", 0.0) + elapsed

    def _correct_polarity(self, items: list[_Item]) -> None:
        """Re-screen images displayed inverted (wrong Photometric Interpretation)."""
        if not self.screen.gate or not items:
            return
        flipped = [
            it
            for it, check in zip(items, self._checks(items), strict=True)
            if check.inverted_probability > POLARITY_FLIP
            and gate.mediastinal_contrast(it.image.pixels) < 0
        ]
        for it in flipped:
            pixels = 1.0 - it.image.pixels
            it.image = DecodedImage(
                pixels, it.image.spacing_mm, it.image.spacing_source, it.image.decoder
            )
            it.tensor = to_network_input(pixels, self.transforms)
            it.result.warnings.append(
                "pixel polarity contradicts Photometric Interpretation; image was inverted"
            )
        if flipped:
            self._screen(flipped)

    def _checks(self, items: list[_Item]) -> list[gate.FeatureCheck]:
        embedding = torch.stack([it.embedding for it in items])  # type: ignore[misc]
        per_item = [it.probes or [] for it in items]
        probes = [torch.stack(p) for p in zip(*per_item, strict=True)]
        return gate.check_features(embedding, probes, self.screen.gate)

    def _gate_features(self, items: list[_Item]) -> list[_Item]:
        """Record each image's feature check; return those in domain (all, without a gate)."""
        if not self.screen.gate:
            return items
        for it, check in zip(items, self._checks(items), strict=True):
            it.result.in_domain, it.result.ood_distance = check.in_domain, check.score
            if not check.in_domain:
                it.result.status = NOT_SCORED
                it.result.reason = (
                    f"image features far from the training data (distance {check.score:.2f} × "
                    f"the refusal threshold at block {check.block}): not a chest radiograph "
                    "the model can score"
                )
        return [it for it in items if it.result.in_domain]

    def _confirm(self, items: list[_Item]) -> None:
        if not items:
            return
        start = time.perf_counter()
        with torch.inference_mode():
            logits = self.confirm.network(self._batch(items)).squeeze(1)
        probs = self.confirm.calibration.apply(logits).tolist()
        elapsed = (time.perf_counter() - start) * 1000 / len(items)
        for it, prob in zip(items, probs, strict=True):
            it.confirm_prob = float(prob)
            it.result.timings_ms["confirm"] = elapsed

    def _finding(self, it: _Item) -> Finding:
        if it.confirm_prob is None:
            return Finding(
                self._label,
                it.screen_prob,
                False,
                "screen",
                self._screen_threshold,
                self.screen.name,
                self.screen.version,
            )
        threshold = self.confirm.thresholds[self._label.name]
        return Finding(
            self._label,
            it.confirm_prob,
            it.confirm_prob >= threshold,
            "confirm",
            threshold,
            self.confirm.name,
            self.confirm.version,
        )

    def _explain(self, items: list[_Item], bundle: Bundle) -> None:
        if not items:
            return
        start = time.perf_counter()
        maps = explain.grad_cam(bundle.network, self._batch(items)).cpu()
        elapsed = (time.perf_counter() - start) * 1000 / len(items)
        for it, cam in zip(items, maps, strict=True):
            it.result.cam = cam.numpy()
            it.result.image_shape = it.image.pixels.shape
            finding = it.result.findings[0]
            caption = (
                f"{finding.label.meaning} p={finding.probability:.2f} "
                f"({finding.stage}, {bundle.identity()})"
            )
            # Rendered from the network-grid map: the overlay is smaller than the image anyway.
            it.result.overlay = explain.render_overlay(it.image.pixels, cam.numpy(), caption)
            it.result.timings_ms["gradcam"] = elapsed
