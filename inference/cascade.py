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
from inference.bundle import Bundle, Label, load_bundle
from inference.decode import DecodedImage, DecodeError, decode
from inference.manifest import finding_bundle_path
from inference.population import UNKNOWN, ImageFacts, Population
from inference.preprocess import inference_transforms, to_network_input

SCORED, NOT_SCORED, ERROR = "scored", "not_scored", "error"
ASSESSED, NOT_ASSESSED = "assessed", "not_assessed"
POLARITY_FLIP = 0.5  # probe probability above which the image is taken as inverted
DEFAULT_FINDINGS = ("pneumonia",)  # the shipped findings (tuberculosis: see its card)


@dataclass(frozen=True)
class Finding:
    """An assessed finding: the probability of the stage that made the final call."""

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
            "status": ASSESSED,
            "reason": None,
            "probability": round(self.probability, 6),
            "present": self.present,
            "stage": self.stage,
            "threshold": round(self.threshold, 6),
            "model": f"{self.model_name} {self.model_version}",
        }


@dataclass(frozen=True)
class NotAssessed:
    """A finding in force that was not assessed on this image, and why (no probability)."""

    label: Label
    reason: str
    model_name: str
    model_version: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "code": self.label.code,
            "scheme": self.label.scheme,
            "meaning": self.label.meaning,
            "status": NOT_ASSESSED,
            "reason": self.reason,
            "present": False,
            "model": f"{self.model_name} {self.model_version}",
        }


@dataclass(frozen=True)
class FindingModels:
    """One finding in force: its label, screen and confirm bundles, and population."""

    name: str
    screen: Bundle
    confirm: Bundle
    population: Population

    @property
    def label(self) -> Label:
        return self.screen.labels[0]

    @property
    def screen_threshold(self) -> float:
        return self.screen.thresholds[self.label.name]

    @property
    def confirm_threshold(self) -> float:
        return self.confirm.thresholds[self.label.name]


@dataclass
class ImageResult:
    sop_instance_uid: str | None
    status: str
    reason: str = ""
    findings: list[Finding] = field(default_factory=list)  # assessed only
    not_assessed: list[NotAssessed] = field(default_factory=list)
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

    def findings_as_dicts(self) -> list[dict[str, Any]]:
        """Every finding in force: the assessed ones, then those not assessed (and why)."""
        return [f.as_dict() for f in self.findings] + [n.as_dict() for n in self.not_assessed]

    def as_dict(self) -> dict[str, Any]:
        return {
            "sop_instance_uid": self.sop_instance_uid,
            "status": self.status,
            "reason": self.reason,
            "findings": self.findings_as_dicts(),
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
    facts: ImageFacts
    tensors: dict[int, torch.Tensor] = field(default_factory=dict)  # input size → tensor
    embedding: torch.Tensor | None = None  # pooled gate features (polarity probe)
    probes: list[torch.Tensor] | None = None  # probe-block statistics (distance gate)
    screen: dict[str, float] = field(default_factory=dict)  # finding → screen probability
    confirm: dict[str, float] = field(default_factory=dict)  # finding → confirm probability
    explained_by: Bundle | None = None


class Cascade:
    """The findings in force, each with its screen and confirm bundles, and the gate.

    The image-domain gate works on the features of the first finding's screen network
    (the one whose bundle carries ``models/gate.pt``), so that finding's screen costs
    nothing extra; every other finding's screen is one more batched forward pass, run
    only on the images inside that finding's population.
    """

    def __init__(
        self, findings: Sequence[FindingModels], heatmaps: bool = True, device: str = "cpu"
    ) -> None:
        if not findings:
            raise ValueError("at least one finding must be in force")
        for finding in findings:
            if finding.screen.role != "screen" or finding.confirm.role != "confirm":
                raise ValueError(f"{finding.name}: bundles given in the wrong roles")
        self.findings = list(findings)
        self.heatmaps = heatmaps
        self.device = torch.device(device)
        for finding in self.findings:
            finding.screen.network.to(self.device)
            finding.confirm.network.to(self.device)
        gated = [f for f in self.findings if f.screen.gate]
        self.gate_finding = gated[0] if gated else self.findings[0]
        self.transforms: dict[int, Any] = {}

    @property
    def screen(self) -> Bundle:
        """The gate finding's screen bundle (its features drive the image gate)."""
        return self.gate_finding.screen

    @property
    def confirm(self) -> Bundle:
        return self.gate_finding.confirm

    def bundles(self) -> list[Bundle]:
        return [b for f in self.findings for b in (f.screen, f.confirm)]

    @classmethod
    def load(
        cls,
        findings: Sequence[str] = DEFAULT_FINDINGS,
        screen_path: Path | None = None,
        confirm_path: Path | None = None,
        screen_thresholds: dict[str, float] | None = None,
        confirm_thresholds: dict[str, float] | None = None,
        heatmaps: bool = True,
        device: str = "cpu",
    ) -> Cascade:
        """The shipped bundles of ``findings``; ``screen_path``/``confirm_path`` and the
        threshold overrides apply to the first finding (the one with the gate)."""
        loaded = []
        for n, name in enumerate(findings):
            screen = screen_path if n == 0 and screen_path else finding_bundle_path(name, "screen")
            confirm = (
                confirm_path if n == 0 and confirm_path else finding_bundle_path(name, "confirm")
            )
            screen_bundle = load_bundle(screen, screen_thresholds if n == 0 else None)
            loaded.append(
                FindingModels(
                    name=name,
                    screen=screen_bundle,
                    confirm=load_bundle(confirm, confirm_thresholds if n == 0 else None),
                    population=Population.from_metadata(screen_bundle.metadata.get("population")),
                )
            )
        return cls(loaded, heatmaps, device)

    # -- public API ----------------------------------------------------------------------

    def analyze(self, datasets: Sequence[Dataset]) -> list[ImageResult]:
        """Results in input order; one batched forward pass per stage and finding."""
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
        return [self._complete(result) for result in results]

    def _complete(self, result: ImageResult) -> ImageResult:
        """Every finding in force is accounted for: one the image never reached (refused
        by the gate, undecodable) is not assessed, for the image's reason."""
        named = {f.label for f in result.findings} | {n.label for n in result.not_assessed}
        for finding in self.findings:
            if finding.label not in named:
                result.not_assessed.append(
                    NotAssessed(
                        finding.label,
                        result.reason or "not scored",
                        finding.screen.name,
                        finding.screen.version,
                    )
                )
        return result

    def analyze_pixels(
        self,
        images: Sequence[DecodedImage],
        uids: Sequence[str | None] | None = None,
        facts: Sequence[ImageFacts] | None = None,
    ) -> list[ImageResult]:
        """The same decision for already decoded display images (no header gate).

        For callers that hold pixels rather than DICOM (evaluation on JPEG test sets,
        other front ends). Without ``facts`` the population is not checked: such a
        caller vouches for it. The feature gate still applies.
        """
        uids = uids if uids is not None else [None] * len(images)
        facts = facts if facts is not None else [UNKNOWN] * len(images)
        items = [
            _Item(ImageResult(uid, SCORED, spacing_mm=image.spacing_mm), image, fact)
            for image, uid, fact in zip(images, uids, facts, strict=True)
        ]
        if items:
            self._run(items, check_population=any(f is not UNKNOWN for f in facts))
        return [self._complete(it.result) for it in items]

    # -- stages --------------------------------------------------------------------------

    def _prepare(self, ds: Dataset) -> _Item | ImageResult:
        uid = str(ds.get("SOPInstanceUID", "")) or None
        decision = gate.check_header(ds)
        if not decision.eligible:
            return ImageResult(uid, NOT_SCORED, decision.reason)
        start = time.perf_counter()
        try:
            image = decode(ds)
            item = _Item(
                ImageResult(uid, SCORED, spacing_mm=image.spacing_mm), image, ImageFacts.of(ds)
            )
            self._tensor(item, self.screen.input_size)
        except DecodeError as exc:
            return ImageResult(uid, ERROR, str(exc))
        except Exception as exc:  # noqa: BLE001 - a bad image must never escape as an exception
            return ImageResult(uid, ERROR, f"preprocessing failed: {type(exc).__name__}: {exc}")
        item.result.timings_ms["preprocess"] = (time.perf_counter() - start) * 1000
        return item

    def _tensor(self, item: _Item, size: int) -> torch.Tensor:
        """The network input at ``size`` (computed once per image and size)."""
        if size not in item.tensors:
            if size not in self.transforms:
                self.transforms[size] = inference_transforms(size)
            item.tensors[size] = to_network_input(item.image.pixels, self.transforms[size])
        return item.tensors[size]

    def _run(self, items: list[_Item], check_population: bool = True) -> None:
        self._screen_with_gate(items)
        self._correct_polarity(items)
        scored = self._gate_features(items)
        for finding in self.findings:
            eligible = []
            for it in scored:
                reason = finding.population.reason_outside(it.facts) if check_population else None
                if reason is None:
                    eligible.append(it)
                else:
                    it.result.not_assessed.append(
                        NotAssessed(
                            finding.label, reason, finding.screen.name, finding.screen.version
                        )
                    )
            if finding is not self.gate_finding:
                self._score(eligible, finding, "screen")
            self._score(
                [it for it in eligible if it.screen[finding.name] >= finding.screen_threshold],
                finding,
                "confirm",
            )
            for it in eligible:
                it.result.findings.append(self._finding(it, finding))
        for it in scored:
            if not it.result.findings:
                it.result.status = NOT_SCORED
                it.result.reason = "no finding assessed: " + "; ".join(
                    f"{n.label.meaning}: {n.reason}" for n in it.result.not_assessed
                )
        if self.heatmaps:
            self._explain([it for it in scored if it.result.findings])

    def _batch(self, items: list[_Item], size: int) -> torch.Tensor:
        return torch.stack([self._tensor(it, size) for it in items]).to(self.device)

    def _screen_with_gate(self, items: list[_Item]) -> None:
        """The gate finding's screen: its probability and the gate's features, one pass."""
        start = time.perf_counter()
        finding = self.gate_finding
        net = finding.screen.network
        with torch.inference_mode():
            embedding, probe = net.embed_and_probe(self._batch(items, finding.screen.input_size))  # type: ignore[operator]
            logits = net.head(embedding).squeeze(1)  # type: ignore[operator]
        probs = finding.screen.calibration.apply(logits).tolist()
        embedding, probe = embedding.cpu(), [p.cpu() for p in probe]
        elapsed = (time.perf_counter() - start) * 1000 / len(items)
        for i, (it, prob) in enumerate(zip(items, probs, strict=True)):
            it.embedding, it.screen[finding.name] = embedding[i], float(prob)
            it.probes = [p[i] for p in probe]
            it.result.timings_ms["screen"] = it.result.timings_ms.get("screen", 0.0) + elapsed

    def _score(self, items: list[_Item], finding: FindingModels, stage: str) -> None:
        """One batched pass of ``finding``'s ``stage`` ("screen" | "confirm") network;
        each item's calibrated probability and its share of the time."""
        if not items:
            return
        bundle = finding.screen if stage == "screen" else finding.confirm
        start = time.perf_counter()
        with torch.inference_mode():
            logits = bundle.network(self._batch(items, bundle.input_size))
        probs = bundle.calibration.apply(logits.squeeze(1)).tolist()
        elapsed = (time.perf_counter() - start) * 1000 / len(items)
        for it, prob in zip(items, probs, strict=True):
            (it.screen if stage == "screen" else it.confirm)[finding.name] = float(prob)
            it.result.timings_ms[stage] = it.result.timings_ms.get(stage, 0.0) + elapsed

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
            it.tensors.clear()
            it.result.warnings.append(
                "pixel polarity contradicts Photometric Interpretation; image was inverted"
            )
        if flipped:
            self._screen_with_gate(flipped)

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

    def _finding(self, it: _Item, finding: FindingModels) -> Finding:
        confirmed = it.confirm.get(finding.name)
        if confirmed is None:
            return Finding(
                finding.label,
                it.screen[finding.name],
                False,
                "screen",
                finding.screen_threshold,
                finding.screen.name,
                finding.screen.version,
            )
        threshold = finding.confirm_threshold
        return Finding(
            finding.label,
            confirmed,
            confirmed >= threshold,
            "confirm",
            threshold,
            finding.confirm.name,
            finding.confirm.version,
        )

    def _explain(self, items: list[_Item]) -> None:
        """Grad-CAM of the finding that matters most on each image (the highest
        probability among the assessed ones), on the network that made its call; images
        are batched per network."""
        by_bundle: dict[str, tuple[Bundle, list[tuple[_Item, Finding]]]] = {}
        for it in items:
            top = max(it.result.findings, key=lambda f: f.probability)
            models = next(f for f in self.findings if f.label == top.label)
            bundle = models.confirm if top.stage == "confirm" else models.screen
            by_bundle.setdefault(bundle.name, (bundle, []))[1].append((it, top))
        for bundle, group in by_bundle.values():
            start = time.perf_counter()
            batch = self._batch([it for it, _ in group], bundle.input_size)
            maps = explain.grad_cam(bundle.network, batch).cpu()
            elapsed = (time.perf_counter() - start) * 1000 / len(group)
            for (it, top), cam in zip(group, maps, strict=True):
                it.result.cam = cam.numpy()
                it.result.image_shape = it.image.pixels.shape
                caption = (
                    f"{top.label.meaning} p={top.probability:.2f} "
                    f"({top.stage}, {bundle.identity()})"
                )
                # Rendered from the network-grid map: the overlay is smaller than the image.
                it.result.overlay = explain.render_overlay(it.image.pixels, cam.numpy(), caption)
                it.result.timings_ms["gradcam"] = elapsed
