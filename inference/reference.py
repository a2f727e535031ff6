"""Reference statistics for drift monitoring, stored in each model bundle.

A model is only as good as the match between what it sees in service and what it was
validated on. To notice when that match degrades (a new detector, another hospital's
population, a changed routing rule) the node compares the live distribution of a few
signals with the distribution the model produced on its own validation data. That
validation distribution is frozen here, at training time, into the bundle as
``configs/reference.json`` (hashed in ``metadata.json`` like the weights, so a reference
cannot drift away from the model it describes)::

    {"schema": 1, "data": "<what it was computed on>", "computed_at": "...Z",
     "signals": {"probability:233604007": {"kind": "numeric", "edges": [...],
                                            "counts": [...], "n": 779},
                 "gate_distance": {...}, "refused": {"kind": "categorical",
                                                     "counts": {"no": 779}, "n": 779}}}

Signals:

- ``probability:<code>``: the calibrated final probability of a finding (SNOMED CT code).
- ``gate_distance``: the input gate's distance score (:attr:`ImageResult.ood_distance`).
- ``refused``: ``"yes"`` / ``"no"``, whether the image went unscored.
- the DICOM header descriptors of :data:`SIGNALS_DESCRIPTORS`, only when the training
  data recorded them: JPEG and PNG training sets carry no header, and an invented
  reference would raise false alarms (or hide real ones).

Numeric signals are binned at the reference's own deciles, so each bin holds about a
tenth of the reference and the live values are binned the same way; categorical ones
are counted per category. The comparison is a population stability index (the effect
size) plus a chi-square test of homogeneity (whether the difference is more than
sampling noise); :func:`level` combines the two.

This module is pure (numpy, scipy, pydicom): the monitoring side imports it without
torch. ``python -m inference.reference BUNDLE_DIR...`` recomputes the reference of
shipped bundles from the data they were validated on; the functions doing so import the
networks lazily.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from scipy.stats import chi2_contingency

from inference.manifest import BundleError, read_metadata, sha256_file
from inference.population import patient_age_years

log = logging.getLogger("inference.reference")

REFERENCE = "configs/reference.json"
SCHEMA = 1

SIGNALS_DESCRIPTORS = ("age", "sex", "view", "manufacturer", "pixel_spacing", "photometric", "bits")
NUMERIC_DESCRIPTORS = ("age", "pixel_spacing")
GATE_DISTANCE = "gate_distance"
REFUSED = "refused"
UNKNOWN = "unknown"  # a categorical value that is not known (missing tag, None)
OTHER = "other"  # a live category the reference never saw

# Population stability index bands in common use (credit scoring, model monitoring):
# below 0.1 no meaningful shift, 0.1-0.25 a moderate shift worth a look, above 0.25 a
# major shift. PSI alone grows with sampling noise on small samples (a handful of live
# images rarely fills ten bins like the reference), so a band only counts when the
# chi-square test also says the two samples differ (p < 0.01).
PSI_WARN = 0.1
PSI_ALERT = 0.25
P_SIGNIFICANT = 0.01
PSI_FLOOR = 1e-4  # proportions floored here: an empty bin would make the index infinite

Signal = dict[str, Any]
Counts = list[int] | dict[str, int]


def probability_signal(code: str) -> str:
    """The signal key of a finding's calibrated final probability."""
    return f"probability:{code}"


# -- header descriptors --------------------------------------------------------------------


def input_descriptors(ds: Dataset) -> dict[str, str | float | None]:
    """The header descriptors of one image (None where not stated or unreadable).

    Never raises: headers in the wild carry empty, malformed and mistyped values, and
    a monitoring hook must not fail the job that calls it. Each value is read alone, so
    one bad tag loses only its own descriptor.
    """
    return {
        "age": _safe(lambda: patient_age_years(ds)),
        "sex": _safe(lambda: _sex(ds)),
        "view": _safe(lambda: _text(ds, "ViewPosition", upper=True)),
        "manufacturer": _safe(lambda: _text(ds, "Manufacturer")),
        "pixel_spacing": _safe(lambda: _spacing(ds)),
        "photometric": _safe(lambda: _text(ds, "PhotometricInterpretation", upper=True)),
        "bits": _safe(lambda: _bits(ds)),
    }


def _safe(read: Any) -> Any:
    try:
        return read()
    except Exception:  # noqa: BLE001 - an odd header value is "unknown", never an error
        return None


def _text(ds: Dataset, keyword: str, upper: bool = False) -> str | None:
    value = ds.get(keyword)
    text = str(value).strip() if value is not None else ""
    return (text.upper() if upper else text) or None


def _sex(ds: Dataset) -> str | None:
    sex = _text(ds, "PatientSex", upper=True)
    return sex if sex in ("M", "F", "O") else None


def _spacing(ds: Dataset) -> float | None:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        if value is None or value == "":
            continue
        first = value[0] if isinstance(value, Sequence) and not isinstance(value, str) else value
        try:
            spacing = float(first)
        except (TypeError, ValueError):
            continue
        if math.isfinite(spacing) and spacing > 0:
            return spacing
    return None


def _bits(ds: Dataset) -> str | None:
    value = ds.get("BitsStored")
    if value is None or value == "":
        return None
    return str(int(value))


# -- references and live counts ------------------------------------------------------------


def _finite(values: Iterable[object]) -> np.ndarray:
    """The numeric values that are known: None, NaN and non-numbers are dropped."""
    kept: list[float] = []
    for value in values:
        if value is None or isinstance(value, str | bytes):
            continue
        try:
            number = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            continue
        if math.isfinite(number):
            kept.append(number)
    return np.asarray(kept, dtype=np.float64)


def numeric_reference(values: Sequence[float | None], bins: int = 10) -> Signal:
    """Bin edges at the reference's own quantiles, and the reference's counts per bin.

    Quantile edges put about ``1/bins`` of the reference in each bin, which keeps every
    bin populated (PSI is unstable on near-empty bins) whatever the signal's scale.
    Only interior cut points are stored; the outer bins are open, so live values beyond
    the reference's range still land in a bin. Tied quantiles (a probability piling up
    near 0 or 1) collapse to one edge. None and NaN values are ignored.
    """
    data = _finite(values)
    if data.size == 0:
        return {"kind": "numeric", "edges": [], "counts": [0], "n": 0}
    quantiles = np.quantile(data, np.linspace(0.0, 1.0, bins + 1)[1:-1])
    # Unrounded: a rounded edge could move above a value tied at it (probabilities
    # saturate at exactly float32 1 - 2**-23 or 1.0), sending the ties to the wrong bin.
    edges = sorted({float(q) for q in quantiles})
    reference: Signal = {"kind": "numeric", "edges": edges, "counts": [], "n": int(data.size)}
    reference["counts"] = live_counts(reference, data.tolist())
    return reference


def categorical_reference(values: Sequence[str | None]) -> Signal:
    """Counts per category; a None value is counted as ``"unknown"``."""
    counts: dict[str, int] = {}
    for value in values:
        key = UNKNOWN if value is None else str(value)
        counts[key] = counts.get(key, 0) + 1
    return {"kind": "categorical", "counts": dict(sorted(counts.items())), "n": len(values)}


def live_counts(reference: Mapping[str, Any], values: Sequence[object]) -> Counts:
    """Live values binned exactly as the reference was.

    Numeric: bin ``np.searchsorted(edges, x, side="right")`` (``len(edges) + 1`` bins;
    None and NaN ignored). Categorical: every reference category (zero when unseen
    live), None as ``"unknown"``, and categories the reference never saw pooled as
    ``"other"`` — one bucket for "new", so that a new manufacturer shows as a shift
    instead of being silently dropped.
    """
    if reference["kind"] == "numeric":
        edges = np.asarray(reference["edges"], dtype=np.float64)
        index = np.searchsorted(edges, _finite(values), side="right")
        return [int(c) for c in np.bincount(index, minlength=len(edges) + 1)]
    counts = {str(key): 0 for key in reference["counts"]}
    for value in values:
        key = UNKNOWN if value is None else str(value)
        if key not in counts and key != UNKNOWN:
            key = OTHER
        counts[key] = counts.get(key, 0) + 1
    return counts


def _aligned(reference: Mapping[str, Any], live: Counts) -> tuple[np.ndarray, np.ndarray]:
    """Reference and live counts over the same columns."""
    if reference["kind"] == "numeric":
        ref = np.asarray(reference["counts"], dtype=np.float64)
        cur = np.asarray(live, dtype=np.float64)
        if ref.shape != cur.shape:
            raise ValueError(f"live counts have {cur.size} bins, the reference {ref.size}")
        return ref, cur
    if not isinstance(live, Mapping):
        raise ValueError("categorical reference needs live counts per category")
    keys = list(dict.fromkeys([*reference["counts"], *live]))
    ref_counts: Mapping[str, int] = reference["counts"]
    return (
        np.asarray([ref_counts.get(k, 0) for k in keys], dtype=np.float64),
        np.asarray([live.get(k, 0) for k in keys], dtype=np.float64),
    )


def psi(reference: Mapping[str, Any], live: Counts) -> float:
    """Population stability index: sum of (live - ref) * ln(live / ref) over the bins.

    Proportions are floored at :data:`PSI_FLOOR` so that a bin empty on one side counts
    as a large, finite shift. 0.0 when either side holds no value (nothing to compare).
    """
    ref, cur = _aligned(reference, live)
    if ref.sum() == 0 or cur.sum() == 0:
        return 0.0
    p = np.maximum(ref / ref.sum(), PSI_FLOOR)
    q = np.maximum(cur / cur.sum(), PSI_FLOOR)
    return float(np.sum((q - p) * np.log(q / p)))


def two_sample_p(reference: Mapping[str, Any], live: Counts) -> float:
    """p-value of a chi-square test of homogeneity of the reference and live counts.

    The 2 × k contingency table drops columns empty in both samples (they carry no
    information and would make expected counts zero). 1.0 when fewer than two columns
    remain or a side is empty: no evidence of a difference.
    """
    ref, cur = _aligned(reference, live)
    keep = (ref + cur) > 0
    if keep.sum() < 2 or ref.sum() == 0 or cur.sum() == 0:
        return 1.0
    result = chi2_contingency(np.stack([ref[keep], cur[keep]]))
    return float(result.pvalue)


def level(psi_value: float, p_value: float) -> str:
    """``"alert"`` (psi >= 0.25), ``"warn"`` (psi >= 0.1) — each only when the test is
    also significant (p < 0.01) — else ``"ok"``.

    The PSI bands are the usual ones; requiring significance keeps a small live sample,
    whose PSI is inflated by noise alone, from raising alarms.
    """
    if p_value < P_SIGNIFICANT and psi_value >= PSI_ALERT:
        return "alert"
    if p_value < P_SIGNIFICANT and psi_value >= PSI_WARN:
        return "warn"
    return "ok"


# -- assembling, writing and reading a reference -------------------------------------------


def outcome_signals(
    code: str,
    probabilities: Sequence[float | None],
    gate_distances: Sequence[float | None] | None = None,
    refused: Sequence[bool] | None = None,
) -> dict[str, Signal]:
    """The model-output signals of one finding's bundle, from per-image outcomes.

    ``probabilities``: the finding's calibrated final probability (None where the image
    was not scored); ``gate_distances`` and ``refused`` only when the data went through
    the gate (omitted otherwise: never a reference for a signal not measured).
    """
    signals = {probability_signal(code): numeric_reference(probabilities)}
    if gate_distances is not None and any(d is not None for d in gate_distances):
        signals[GATE_DISTANCE] = numeric_reference(gate_distances)
    if refused is not None:
        signals[REFUSED] = categorical_reference(["yes" if r else "no" for r in refused])
    return signals


def descriptor_signals(descriptors: Sequence[Mapping[str, object]]) -> dict[str, Signal]:
    """References of the header descriptors a DICOM training set actually records
    (those of :func:`input_descriptors`); a descriptor unknown on every image is left out."""
    signals: dict[str, Signal] = {}
    for name in SIGNALS_DESCRIPTORS:
        values = [d.get(name) for d in descriptors]
        if all(v is None for v in values):
            continue
        if name in NUMERIC_DESCRIPTORS:
            signals[name] = numeric_reference([v for v in values if isinstance(v, int | float)])
        else:
            signals[name] = categorical_reference([None if v is None else str(v) for v in values])
    return signals


def build_reference(signals: dict[str, Signal], data: str) -> dict[str, Any]:
    """The reference document: what it was computed on, when, and the signals."""
    return {
        "schema": SCHEMA,
        "data": data,
        "computed_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "signals": signals,
    }


def write_reference(bundle_path: Path, reference: Mapping[str, Any]) -> None:
    """Write ``configs/reference.json`` and list its sha256 in ``metadata.json``.

    Only the reference's own entry of the ``sha256`` map changes: the other files keep
    the digests they had (a tampered weights file is not re-blessed here).
    """
    bundle_path = Path(bundle_path)
    meta = read_metadata(bundle_path)
    file = bundle_path / REFERENCE
    file.write_text(json.dumps(reference, indent=2) + "\n")
    meta.setdefault("sha256", {})[REFERENCE] = sha256_file(file)
    (bundle_path / "configs" / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")


def read_reference(bundle_path: Path) -> dict[str, Any] | None:
    """The bundle's reference, or None when it has none (bundles built before them).

    A reference that is present but unreadable raises :class:`BundleError`: the bundle
    loader's integrity check refuses such a bundle anyway.
    """
    file = Path(bundle_path) / REFERENCE
    if not file.is_file():
        return None
    try:
        reference: dict[str, Any] = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{file}: invalid JSON ({exc})") from exc
    if reference.get("schema") != SCHEMA or not isinstance(reference.get("signals"), dict):
        raise BundleError(f"{file}: not a schema {SCHEMA} drift reference")
    return reference


# -- computing references with the networks (torch imported lazily) ------------------------


def cascade_references(
    screen_path: Path,
    confirm_path: Path,
    images: Sequence[np.ndarray],
    data: str,
    batch: int = 32,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The screen's and the confirm's references of a classifier finding, from running
    the node's cascade (screen → confirm behind the feature gate; no anatomy stage) on
    8-bit display images.

    Confirm bundle (the finding's decision model): the cascade's final probability,
    whichever stage produced it. Screen bundle: the screen's own calibrated probability
    (stage-independent). Both: the gate distance of every image and whether it was
    refused; probabilities only for the images the cascade scored.
    """
    import torch

    from inference.cascade import SCORED, Cascade
    from inference.decode import DecodedImage
    from inference.preprocess import inference_transforms, to_network_input

    meta = read_metadata(screen_path)
    cascade = Cascade.load(
        findings=(str(meta["finding"]),),
        screen_path=screen_path,
        confirm_path=confirm_path,
        anatomy=False,
        heatmaps=False,
    )
    finding = cascade.gate_finding
    screen = finding.screen
    transforms = inference_transforms(screen.input_size)
    final: list[float | None] = []
    screened: list[float | None] = []
    distances: list[float | None] = []
    refused: list[bool] = []
    for start in range(0, len(images), batch):
        decoded = [
            DecodedImage(img.astype(np.float32) / 255.0, None, None, "reference")
            for img in images[start : start + batch]
        ]
        results = cascade.analyze_pixels(decoded)
        pixels = []
        for image, result in zip(decoded, results, strict=True):
            found = next((f for f in result.findings if f.label == finding.label), None)
            scored = result.status == SCORED and found is not None
            final.append(found.probability if scored and found is not None else None)
            distances.append(result.ood_distance)
            refused.append(not scored)
            inverted = any("pixel polarity" in w for w in result.warnings)
            pixels.append(1.0 - image.pixels if inverted else image.pixels)
        with torch.inference_mode():
            tensors = torch.stack([to_network_input(p, transforms) for p in pixels])
            probs = screen.calibration.apply(screen.network(tensors).squeeze(1)).tolist()
        screened.extend(
            float(p) if not r else None
            for p, r in zip(probs, refused[start : start + batch], strict=True)
        )
    code = finding.label.code
    return (
        build_reference(outcome_signals(code, screened, distances, refused), data),
        build_reference(outcome_signals(code, final, distances, refused), data),
    )


def segment_reference(
    segment_path: Path, images: Sequence[np.ndarray], data: str, batch: int = 16
) -> dict[str, Any]:
    """The segment bundle's reference: the cardiomegaly probability (the bundle's
    logistic on the measured cardiothoracic ratio) and whether the anatomy was refused
    (masks not measurable), from display images in [0, 1] (the caller vouches for the
    population, as :meth:`Cascade.analyze_pixels` callers do)."""
    from inference import anatomy
    from inference.cardiomegaly import CardiomegalyRule
    from inference.segment import Segmenter

    segmenter = Segmenter.load(segment_path)
    rule = CardiomegalyRule.from_bundle(segmenter.bundle)
    probabilities: list[float | None] = []
    refused: list[bool] = []
    for start in range(0, len(images), batch):
        chunk = [np.asarray(img, dtype=np.float32) for img in images[start : start + batch]]
        for image, masks in zip(chunk, segmenter.masks(chunk), strict=True):
            shape = (int(image.shape[0]), int(image.shape[1]))
            measured = anatomy.measure(masks, shape)
            ratio = measured.ctr if measured.assessed else None
            probabilities.append(None if ratio is None else rule.probability(ratio))
            refused.append(ratio is None)
    signals = outcome_signals(rule.label.code, probabilities, refused=refused)
    return build_reference(signals, data)


def _group(bundles: Sequence[Path]) -> tuple[dict[str, dict[str, Path]], list[Path]]:
    """Classifier bundles to write, by finding ({finding: {role: path}}), and the
    segment bundles."""
    findings: dict[str, dict[str, Path]] = {}
    segments: list[Path] = []
    for path in bundles:
        meta = read_metadata(path)
        role = str(meta.get("role"))
        if role == "segment":
            segments.append(path)
        elif role in ("screen", "confirm") and meta.get("finding"):
            findings.setdefault(str(meta["finding"]), {})[role] = path
        else:
            raise BundleError(f"{path}: no reference recipe for a {role} bundle")
    return findings, segments


def recompute(bundles: Sequence[Path], data: Path, limit: int | None = None) -> None:
    """Recompute and write the reference of shipped bundles from the data they were
    validated on: the Kermany patient-level validation split for the pneumonia pair
    (a bundle given alone is paired with the shipped bundle of the other role), the
    cxr-anatomy images for the segment bundle (in-sample: its final network was trained
    on all of them)."""
    from inference.datasets import load_kermany
    from inference.manifest import finding_bundle_path

    findings, segments = _group(bundles)
    for name, roles in findings.items():
        if name != "pneumonia":
            raise BundleError(
                f"{name}: no validation split to recompute from (its reference is written "
                "by inference.train_finding from the out-of-fold predictions)"
            )
        screen = roles.get("screen", finding_bundle_path(name, "screen"))
        confirm = roles.get("confirm", finding_bundle_path(name, "confirm"))
        _, val = load_kermany(data / "kermany-train")
        expected = read_metadata(screen)["training"].get("val_images")
        if expected is not None and expected != len(val.labels):
            raise BundleError(f"validation split has {len(val.labels)} images, {expected} trained")
        images = val.images[:limit] if limit else val.images
        description = kermany_description(len(images), len(set(val.patients[: len(images)])))
        start = time.time()
        references = dict(
            zip(
                ("screen", "confirm"),
                cascade_references(screen, confirm, list(images), description),
                strict=True,
            )
        )
        log.info("%s: cascade on %d images in %.0f s", name, len(images), time.time() - start)
        for role, path in roles.items():
            write_reference(path, references[role])
            log.info("%s: %s", path, summary(references[role]))
    if segments:
        from inference.train_segment import load as load_anatomy

        _, anatomy_images, _, _ = load_anatomy(data / "cxr-anatomy")
        chosen = anatomy_images[:limit] if limit else anatomy_images
        for path in segments:
            start = time.time()
            reference = segment_reference(path, list(chosen), anatomy_description(len(chosen)))
            log.info("segment on %d images in %.0f s", len(chosen), time.time() - start)
            write_reference(path, reference)
            log.info("%s: %s", path, summary(reference))


def kermany_description(images: int, patients: int) -> str:
    return (
        "Kermany et al. v2 training split: the patient-level validation split the bundle "
        f"was validated on ({images} images of {patients} patients), run through the node's "
        "cascade (screen -> confirm behind the feature gate, no anatomy stage, no header)"
    )


def anatomy_description(images: int) -> str:
    return (
        f"cxr-anatomy (Wingspan CTR set): {images} images, segmented by the shipped final "
        "network, which was trained on these same images - in-sample, so the ratios are "
        "somewhat more accurate than on unseen images"
    )


def summary(reference: Mapping[str, Any]) -> str:
    """One line per reference: n and, per signal, its quartiles or category shares."""
    parts = []
    for key, signal in reference["signals"].items():
        if signal["kind"] == "categorical":
            shares = {k: round(v / max(1, signal["n"]), 4) for k, v in signal["counts"].items()}
            parts.append(f"{key} n={signal['n']} {shares}")
        else:
            parts.append(f"{key} n={signal['n']} edges={signal['edges']}")
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="(Re)compute the drift reference of model bundles from their data."
    )
    parser.add_argument("bundles", nargs="+", type=Path, metavar="BUNDLE_DIR")
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--limit", type=int, help="first N images only (smoke runs)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import torch

    torch.set_num_threads(args.threads)
    start = time.time()
    recompute(args.bundles, args.data, args.limit)
    log.info("done in %.0f s", time.time() - start)


if __name__ == "__main__":
    main()
