"""Screen → confirm: the node's clinical decision for a batch of radiographs.

Every eligible image goes through the MobileNetV3 screen in one batched forward pass; the
screen's pooled features also feed the input gate (distance to training features, pixel
polarity). The images the gate admits are segmented (heart, lungs: :mod:`inference.segment`),
and those without a plausible pair of lungs are refused. Images whose calibrated screen
probability reaches the screen threshold (chosen on validation for very high sensitivity)
go through the ResNet confirm pass, again as one batch. Measured findings (cardiomegaly)
are called from the anatomy. Each finding records which stage produced its probability,
and Grad-CAM is computed on the network that made that final call, then checked against
the lung fields.

Nothing here raises for a bad image: each input gets an :class:`ImageResult` whose
``status`` is ``scored``, ``not_scored`` (with the gate's reason) or ``error``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydicom.dataset import Dataset

from inference import anatomy, explain, gate
from inference.anatomy import Anatomy
from inference.bundle import Bundle, Label, load_bundle
from inference.cardiomegaly import CardiomegalyRule
from inference.decode import DecodedImage, DecodeError, decode
from inference.findings import Finding, NotAssessed
from inference.manifest import finding_bundle_path, is_measured
from inference.population import UNKNOWN, ImageFacts, Population
from inference.preprocess import inference_transforms, to_network_input
from inference.segment import Segmenter, SegmentInput

SCORED, NOT_SCORED, ERROR = "scored", "not_scored", "error"
POLARITY_FLIP = 0.5  # probe probability above which the image is taken as inverted
DEFAULT_FINDINGS = ("pneumonia", "cardiomegaly")  # shipped (tuberculosis: see its card)


@dataclass(frozen=True)
class AnatomyOptions:
    """How the heart and lung segmentation is used (``[inference]`` settings)."""

    gate: bool = True  # no plausible pair of lungs: not scored as a chest radiograph
    outlines: bool = True  # draw the lung and heart outlines on the overlay
    ctr_lines: bool = True  # draw the two widths of the ratio and its value
    min_lung_share: float = 0.5  # Grad-CAM share inside the lungs below which the SR warns
    cardiomegaly_ratio: float | None = None  # None: the bundle's (0.50)


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
    anatomy: Anatomy | None = None  # heart and lung masks and measurements
    explained: Label | None = None  # the finding the Grad-CAM map explains
    spacing_mm: tuple[float, float] | None = None
    image_shape: tuple[int, int] | None = None  # rows × columns of the source
    timings_ms: dict[str, float] = field(default_factory=dict)

    @property
    def explained_finding(self) -> Finding | None:
        """The assessed finding the heatmap explains (None: no heatmap)."""
        return next((f for f in self.findings if f.label == self.explained), None)

    @property
    def masks(self) -> np.ndarray | None:
        """Heart, right and left lung masks (bool, 3 × S × S on the segmentation grid),
        only when the anatomy was assessed: what the SEG output is built from."""
        if self.anatomy is None or not self.anatomy.assessed:
            return None
        return self.anatomy.masks

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
            "anatomy": None if self.anatomy is None else self.anatomy.as_dict(),
            "measurements": [m.as_dict() for m in self.anatomy.measurements]
            if self.anatomy is not None
            else [],
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
        self,
        findings: Sequence[FindingModels],
        heatmaps: bool = True,
        device: str = "cpu",
        segmenter: Segmenter | None = None,
        cardiomegaly: CardiomegalyRule | None = None,
        anatomy_options: AnatomyOptions | None = None,
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
        self.segmenter = segmenter
        if cardiomegaly is not None and segmenter is None:
            raise ValueError("cardiomegaly needs the heart and lung segmentation")
        self.cardiomegaly = cardiomegaly
        self.anatomy_options = anatomy_options or AnatomyOptions()

    @property
    def screen(self) -> Bundle:
        """The gate finding's screen bundle (its features drive the image gate)."""
        return self.gate_finding.screen

    @property
    def confirm(self) -> Bundle:
        return self.gate_finding.confirm

    def bundles(self) -> list[Bundle]:
        segment = [self.segmenter.bundle] if self.segmenter else []
        return [b for f in self.findings for b in (f.screen, f.confirm)] + segment

    def labels_in_force(self) -> list[tuple[Label, str, str]]:
        """Every finding in force: its label and the model (name, version) answering it."""
        labels = [(f.label, f.screen.name, f.screen.version) for f in self.findings]
        if self.cardiomegaly is not None:
            rule = self.cardiomegaly
            labels.append((rule.label, rule.model_name, rule.model_version))
        return labels

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
        anatomy: bool = True,
        segment_path: Path | None = None,
        anatomy_options: Mapping[str, Any] | None = None,
        bundle_paths: Mapping[str, Mapping[str, Path]] | None = None,
    ) -> Cascade:
        """The shipped bundles of ``findings``; ``screen_path``/``confirm_path`` and the
        threshold overrides apply to the first finding (the one with the gate).
        ``bundle_paths`` (finding → role → path) puts other versions in force for any
        finding (a model registry's choice); it wins over the paths above.

        Measured findings (cardiomegaly) come from the segmentation bundle, which is
        loaded when ``anatomy`` is on or such a finding is in force.
        """
        measured = [name for name in findings if is_measured(name)]
        classified = [name for name in findings if not is_measured(name)]
        if not classified:
            raise ValueError("at least one classifier finding must be in force (the gate)")
        options = AnatomyOptions(**(anatomy_options or {}))
        segmenter = Segmenter.load(segment_path, device) if anatomy or measured else None
        rule = (
            CardiomegalyRule.from_bundle(segmenter.bundle, options.cardiomegaly_ratio)
            if segmenter is not None and "cardiomegaly" in measured
            else None
        )
        loaded = []
        for n, name in enumerate(classified):
            chosen = (bundle_paths or {}).get(name, {})
            screen = chosen.get("screen") or (
                screen_path if n == 0 and screen_path else finding_bundle_path(name, "screen")
            )
            confirm = chosen.get("confirm") or (
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
        return cls(loaded, heatmaps, device, segmenter, rule, options)

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
        for label, model_name, model_version in self.labels_in_force():
            if label not in named:
                result.not_assessed.append(
                    NotAssessed(label, result.reason or "not scored", model_name, model_version)
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
        scored = self._segment(self._gate_features(items))
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
        if self.cardiomegaly is not None:
            for it in scored:
                outcome = self.cardiomegaly.assess(it.result.anatomy, it.facts)
                if isinstance(outcome, Finding):
                    it.result.findings.append(outcome)
                else:
                    it.result.not_assessed.append(outcome)
        for it in scored:
            if not it.result.findings:
                it.result.status = NOT_SCORED
                it.result.reason = "no finding assessed: " + "; ".join(
                    f"{n.label.meaning}: {n.reason}" for n in it.result.not_assessed
                )
        if self.heatmaps:
            self._explain([it for it in scored if it.result.findings])

    def _segment(self, items: list[_Item]) -> list[_Item]:
        """Heart and lung masks (and measurements) for the images still in; with the
        anatomy gate on, those without a plausible pair of lungs are refused here."""
        if self.segmenter is None or not items:
            return items
        start = time.perf_counter()
        found = self.segmenter.analyze(
            [
                SegmentInput(
                    it.image.pixels, it.facts, it.image.spacing_mm, it.image.spacing_source
                )
                for it in items
            ]
        )
        elapsed = (time.perf_counter() - start) * 1000 / len(items)
        kept = []
        for it, result in zip(items, found, strict=True):
            it.result.anatomy = result
            it.result.timings_ms["segment"] = elapsed
            problem = anatomy.lung_problem(result.masks) if self.anatomy_options.gate else None
            if problem is None:
                kept.append(it)
            else:
                it.result.status = NOT_SCORED
                it.result.reason = (
                    f"{problem}: no plausible pair of lung fields, not scored as a chest radiograph"
                )
        return kept

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
        """Grad-CAM of the classifier finding that matters most on each image (the
        highest probability among the assessed ones), on the network that made its call;
        images are batched per network. An image with only measured findings gets the
        overlay without a heatmap (outlines and the ratio's widths)."""
        by_bundle: dict[str, tuple[Bundle, list[tuple[_Item, Finding]]]] = {}
        classifier_labels = {f.label: f for f in self.findings}
        for it in items:
            classified = [f for f in it.result.findings if f.label in classifier_labels]
            if not classified:
                self._measured_overlay(it)
                continue
            top = max(classified, key=lambda f: f.probability)
            models = classifier_labels[top.label]
            bundle = models.confirm if top.stage == "confirm" else models.screen
            by_bundle.setdefault(bundle.name, (bundle, []))[1].append((it, top))
        options = self.anatomy_options
        for bundle, group in by_bundle.values():
            start = time.perf_counter()
            batch = self._batch([it for it, _ in group], bundle.input_size)
            maps = explain.grad_cam(bundle.network, batch).cpu()
            elapsed = (time.perf_counter() - start) * 1000 / len(group)
            for (it, top), cam in zip(group, maps, strict=True):
                it.result.cam = cam.numpy()
                it.result.image_shape = it.image.pixels.shape
                it.result.explained = top.label
                self._check_explanation(it, top)
                caption = (
                    f"{top.label.meaning} p={top.probability:.2f} "
                    f"({top.stage}, {bundle.identity()})"
                )
                # Rendered from the network-grid map: the overlay is smaller than the image.
                it.result.overlay = explain.render_overlay(
                    it.image.pixels,
                    cam.numpy(),
                    caption,
                    it.result.anatomy,
                    options.outlines,
                    options.ctr_lines,
                )
                it.result.timings_ms["gradcam"] = elapsed

    def _check_explanation(self, it: _Item, explained: Finding) -> None:
        """Where the heatmap lies: its share inside the lung fields and the heart, on the
        explained finding; a warning when the model looked mostly outside the lungs."""
        found, cam = it.result.anatomy, it.result.cam
        if found is None or cam is None or anatomy.lung_problem(found.masks) is not None:
            return
        lungs = found.mask(anatomy.RIGHT_LUNG) | found.mask(anatomy.LEFT_LUNG)
        lung_share = anatomy.cam_share(cam, lungs)
        heart_share = anatomy.cam_share(cam, found.mask(anatomy.HEART))
        checked = replace(explained, cam_lung_share=lung_share, cam_heart_share=heart_share)
        it.result.findings[it.result.findings.index(explained)] = checked
        if lung_share is not None and lung_share < self.anatomy_options.min_lung_share:
            it.result.warnings.append(
                f"the model looked mostly outside the lungs: {lung_share:.0%} of the "
                f"{explained.label.meaning.lower()} heatmap lies inside the lung fields"
            )

    def _measured_overlay(self, it: _Item) -> None:
        """The annotated image for an image whose findings are all measured."""
        found = it.result.anatomy
        if found is None or not found.assessed or found.ctr is None:
            return
        caption = f"Cardiothoracic ratio {found.ctr:.2f} ({found.model_name} {found.model_version})"
        it.result.overlay = explain.render_overlay(
            it.image.pixels,
            None,
            caption,
            found,
            self.anatomy_options.outlines,
            self.anatomy_options.ctr_lines,
        )
