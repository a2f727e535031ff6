"""Train the screen and confirm bundles of one finding, with k-fold cross-validation.

One seeded command per finding::

    python -m inference.train_finding tuberculosis --data ../shared/data/tb-sakha

For each of ``--folds`` folds (grouped by patient where the folder names patients, and
stratified by label) a screen (MobileNetV3-Small) and a confirm (ResNet-18, half width)
network are trained from scratch on the other folds for a fixed number of epochs — no
early stopping on the held-out fold, so its predictions are honest. The out-of-fold
predictions of all folds are pooled; the calibration (positive-weight offset plus one
temperature) and the thresholds are fitted on that pool, so they hold across folds rather
than on one lucky split, and every figure reported (AUROC, sensitivity, specificity at
the chosen threshold, ECE) is given as the mean ± sd over folds of the out-of-fold
predictions under that calibration. Final networks are then trained on all images and
written as bundles with the finding's intended population, a model card and a drift
reference of the pooled out-of-fold probabilities.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import monai
import numpy as np
import pydicom
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from inference import evaluate, reference
from inference.bundle import (
    BUNDLES_DIR,
    CONFIRM_BUNDLE,
    SCREEN_BUNDLE,
    WEIGHTS,
    Calibration,
    build_network,
    network_data_format,
    write_bundle,
)
from inference.datasets import Split, _read_grey
from inference.preprocess import KEY, inference_transforms, training_transforms
from inference.train import run_epoch, seed_everything

log = logging.getLogger("inference.train_finding")

NETWORKS = {
    "screen": (
        "MobileNetV3-Small",
        {"_target_": "inference.networks.MobileNetV3", "in_channels": 1, "num_classes": 1},
        3e-3,
    ),
    "confirm": (
        "ResNet-18 (MONAI, half width)",
        {"_target_": "inference.networks.resnet18", "in_channels": 1, "num_classes": 1},
        2e-3,
    ),
}


@dataclass(frozen=True)
class FindingSpec:
    """What a finding's training needs to know about its data and its claims."""

    name: str
    code: str
    scheme: str
    meaning: str
    positive: str  # the label value of a positive image in labels.csv
    population: dict[str, Any]
    data_source: str
    licence: str
    limits: tuple[str, ...]
    screen_sensitivity: float = 0.95  # the screen passes on at least this share of positives


FINDINGS = {
    "tuberculosis": FindingSpec(
        name="tuberculosis",
        code="154283005",
        scheme="SCT",
        meaning="Pulmonary tuberculosis",
        positive="tb",
        population={
            "age_years": [18, 120],
            "views": ["PA", "AP"],
            "modalities": ["CR", "DX"],
            "unknown_age": "not_assessed",
            "description": "adults (the training images are adult CXRs)",
        },
        data_source="Sakha-TB 400-image sample (Yakutia, Russia): Pchelintsev et al., "
        "Computational Mathematics and Modeling 33(4), 2022",
        licence="CC BY 4.0 (as reported by the source)",
        limits=(
            "302 images from one site (Yakutia, Russia), 224×224 8-bit crops: small, "
            "single-site and low resolution; the cross-validated figures carry that "
            "uncertainty (see the standard deviations).",
            "No patient identifiers are given: folds are by image.",
            "Trained only on adult TB and normal films of that site; other pathologies, "
            "children, devices and other scanners are not represented.",
            "Labels are image-level (TB / normal); no localisation was supervised: the "
            "heatmap is an explanation aid, not a lesion map.",
        ),
    ),
}


class _Images(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    def __init__(self, images: np.ndarray, labels: np.ndarray, size: int, train: bool) -> None:
        self.images, self.labels = images, labels
        self.transforms = training_transforms(size) if train else inference_transforms(size)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        display = self.images[i].astype(np.float32) / 255.0
        image = torch.as_tensor(self.transforms({KEY: display})[KEY])
        return image, torch.tensor([self.labels[i]])


def load_folder(root: Path, positive: str) -> Split:
    """``labels.csv`` with ``path``/``image``, ``label`` and optional ``patient``."""
    with (root / "labels.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    images = np.stack([_read_grey(root / (r.get("path") or r["image"])) for r in rows])
    labels = np.array([r["label"] == positive for r in rows], dtype=np.float32)
    patients = [r.get("patient") or f"image-{i}" for i, r in enumerate(rows)]
    return Split(images, labels, patients)


def folds_of(split: Split, k: int, seed: int) -> list[np.ndarray]:
    """Fold index per image: whole patients per fold, labels balanced across folds."""
    rng = random.Random(seed)
    by_patient: dict[str, list[int]] = {}
    for i, patient in enumerate(split.patients):
        by_patient.setdefault(patient, []).append(i)
    fold = np.zeros(len(split.labels), dtype=int)
    for label in (0.0, 1.0):
        group = [p for p, idx in by_patient.items() if split.labels[idx[0]] == label]
        rng.shuffle(group)
        for n, patient in enumerate(group):
            fold[by_patient[patient]] = n % k
    return [np.flatnonzero(fold == f) for f in range(k)]


def initial_network(role: str, init: Path | None) -> nn.Module:
    """A fresh network, or one starting from the weights of one of our own bundles
    (trained here on another finding: no downloaded weights)."""
    _, network_def, _ = NETWORKS[role]
    network = build_network(network_def)
    if init is not None:
        state = torch.load(init / WEIGHTS, map_location="cpu", weights_only=True)
        network.load_state_dict({k: v.float() for k, v in state.items()})
    return network


def train_network(
    role: str,
    images: np.ndarray,
    labels: np.ndarray,
    size: int,
    epochs: int,
    init: Path | None = None,
) -> tuple[nn.Module, float]:
    """A network trained for ``epochs`` (the last epoch's weights) and its positive weight."""
    _, _, lr = NETWORKS[role]
    if init is not None:
        lr /= 3  # fine-tuning: the features are already useful
    network = initial_network(role, init)
    n_pos = float(labels.sum())
    pos_weight = (len(labels) - n_pos) / n_pos
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([pos_weight]))
    loader = DataLoader(
        _Images(images, labels, size, train=True), batch_size=32, shuffle=True, drop_last=True
    )
    opt = torch.optim.AdamW(network.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=epochs * len(loader), pct_start=0.2
    )
    for epoch in range(epochs):
        start = time.time()
        loss = run_epoch(network, loader, loss_fn, opt, sched)
        log.info(
            "%s epoch %d/%d loss %.4f (%.0fs)", role, epoch + 1, epochs, loss, time.time() - start
        )
    network.eval()
    return network, pos_weight


def predict(network: nn.Module, images: np.ndarray, size: int) -> np.ndarray:
    loader = DataLoader(_Images(images, np.zeros(len(images), np.float32), size, False), 64)
    with torch.no_grad():
        return torch.cat([network(b).squeeze(1) for b, _ in loader]).double().numpy()


def cross_validate(
    spec: FindingSpec, split: Split, role: str, args: argparse.Namespace
) -> dict[str, Any]:
    """Out-of-fold logits, the pooled calibration and threshold, per-fold figures."""
    folds = folds_of(split, args.folds, args.seed)
    logits = np.zeros(len(split.labels))
    offsets = []
    for f, held_out in enumerate(folds):
        seed_everything(args.seed + f)
        train_idx = np.setdiff1d(np.arange(len(split.labels)), held_out)
        network, pos_weight = train_network(
            role,
            split.images[train_idx],
            split.labels[train_idx],
            args.size,
            args.epochs[role],
            args.init[role],
        )
        logits[held_out] = predict(network, split.images[held_out], args.size)
        offsets.append(-math.log(pos_weight))
        log.info(
            "%s fold %d/%d AUROC %.4f",
            role,
            f + 1,
            args.folds,
            evaluate.auroc(split.labels[held_out], logits[held_out]),
        )
    offset = float(np.mean(offsets))
    temperature = evaluate.fit_temperature(logits + offset, split.labels)
    calibration = Calibration(temperature, offset)
    probs = calibration.apply(torch.as_tensor(logits)).numpy()
    if role == "screen":
        threshold = evaluate.threshold_for_sensitivity(split.labels, probs, spec.screen_sensitivity)
    else:
        threshold = evaluate.threshold_youden(split.labels, probs)
    per_fold = [
        evaluate.binary_metrics(split.labels[idx], probs[idx], threshold).as_dict() for idx in folds
    ]
    summary = {
        key: {
            "mean": round(float(np.mean([m[key] for m in per_fold])), 4),
            "sd": round(float(np.std([m[key] for m in per_fold], ddof=1)), 4),
        }
        for key in ("auroc", "sensitivity", "specificity", "ece")
    }
    pooled = evaluate.binary_metrics(split.labels, probs, threshold).as_dict()
    return {
        "calibration": {"temperature": round(temperature, 5), "logit_offset": round(offset, 5)},
        "threshold": round(float(threshold), 5),
        "cross_validation": {
            "folds": args.folds,
            "split": "by patient" if spec.name != "tuberculosis" else "by image",
            "epochs": args.epochs[role],
            "per_fold_mean_sd": summary,
            "pooled_out_of_fold": pooled,
        },
        "oof_probabilities": probs,
    }


def metadata(
    spec: FindingSpec, role: str, cv: dict[str, Any], split: Split, args: argparse.Namespace
) -> dict[str, Any]:
    title, _, _ = NETWORKS[role]
    name = f"cxr_{spec.name}_{role}_{'mobilenetv3' if role == 'screen' else 'resnet18'}"
    label = {"name": spec.name, "code": spec.code, "scheme": spec.scheme, "meaning": spec.meaning}
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/"
        "0.8.1/meta_schema_20220324.json",
        "name": name,
        "version": args.version,
        "changelog": {args.version: f"first release: {spec.meaning}, trained from scratch"},
        "role": role,
        "finding": spec.name,
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "pydicom_version": pydicom.__version__,
        "task": f"{spec.meaning} {role} on frontal chest radiographs ({title})",
        "description": f"Binary {spec.meaning.lower()} classifier for frontal chest radiographs.",
        "authors": "CXR AI node maintainers",
        "copyright": f"Weights: Apache-2.0. Training data: {spec.licence}.",
        "data_source": spec.data_source,
        "data_type": "jpeg",
        "intended_use": "Worklist triage support; not a diagnosis.",
        "population": spec.population,
        "labels": [label],
        "thresholds": {spec.name: cv["threshold"]},
        "calibration": cv["calibration"],
        "eval_metrics": {"cross_validation": cv["cross_validation"]},
        "training": {
            "seed": args.seed,
            "images": int(len(split.labels)),
            "positives": int(split.labels.sum()),
            "epochs": args.epochs[role],
            "trained_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        },
        "network_data_format": network_data_format(args.size, spec.name),
    }


def model_card(spec: FindingSpec, role: str, meta: dict[str, Any]) -> str:
    cv = meta["eval_metrics"]["cross_validation"]
    s = cv["per_fold_mean_sd"]
    pooled = cv["pooled_out_of_fold"]
    pop = meta["population"]
    rows = "\n".join(
        f"| {key} | {s[key]['mean']} ± {s[key]['sd']} |"
        for key in ("auroc", "sensitivity", "specificity", "ece")
    )
    limits = "\n".join(f"- {line}" for line in spec.limits)
    return f"""# {meta["name"]} {meta["version"]}

{NETWORKS[role][0]}, single-channel input {
        meta["network_data_format"]["inputs"]["image"]["spatial_shape"][0]
    } px, role **{role}** for the finding **{spec.meaning}**
({spec.scheme} {spec.code}). Trained from scratch, seed {meta["training"]["seed"]}.

## Intended use and population
Worklist triage support; **not** a diagnosis. Assessed only on frontal ({", ".join(pop["views"])}) {
        ", ".join(pop["modalities"])
    } chest radiographs of patients aged
{pop["age_years"][0]}–{pop["age_years"][1]} years ({pop["description"]}); outside that
population — or when the age is unknown — the node reports the finding as *not assessed*
with the reason, and it never feeds the worklist priority.

## Training data
{spec.data_source}; licence {spec.licence}. {meta["training"]["images"]} images,
{meta["training"]["positives"]} positive.

## Cross-validated performance ({cv["folds"]} folds, {cv["split"]}, {
        cv["epochs"]
    } epochs, out-of-fold)
Calibration (one temperature over the pooled out-of-fold logits) and threshold
({meta["thresholds"][spec.name]}) are fitted on the pooled out-of-fold predictions; figures
are mean ± sd over the folds.

| metric | mean ± sd |
|---|---|
{rows}

Pooled out-of-fold: AUROC {pooled["auroc"]}, sensitivity {pooled["sensitivity"]},
specificity {pooled["specificity"]}, ECE {pooled["ece"]} (n = {pooled["n"]}).
The shipped network is trained on all images with the same recipe; its own performance is
estimated by these cross-validated figures, not measured.

## Limitations
{limits}

## Drift reference
`configs/reference.json`: the finding's probability over the pooled out-of-fold
predictions, binned at its own deciles (`inference/reference.py`). No gate distance or
refusals (the finding runs behind the pneumonia screen's gate), no header descriptor.
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("finding", choices=sorted(FINDINGS))
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--screen-epochs", type=int, default=25)
    parser.add_argument("--confirm-epochs", type=int, default=20)
    parser.add_argument("--only", choices=sorted(NETWORKS))
    parser.add_argument("--cv-only", action="store_true", help="no final training")
    parser.add_argument("--out", type=Path, default=BUNDLES_DIR)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--version", default="1.0.0")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument(
        "--init-from-pneumonia",
        action="store_true",
        help="start from the shipped pneumonia networks (transfer, not from scratch)",
    )
    args = parser.parse_args(argv)
    args.epochs = {"screen": args.screen_epochs, "confirm": args.confirm_epochs}
    args.init = (
        {"screen": SCREEN_BUNDLE, "confirm": CONFIRM_BUNDLE}
        if args.init_from_pneumonia
        else {"screen": None, "confirm": None}
    )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = FINDINGS[args.finding]
    split = load_folder(args.data, spec.positive)
    log.info("%s: %d images, %d positive", spec.name, len(split.labels), int(split.labels.sum()))
    oof: dict[str, dict[str, Any]] = {}
    for role in [args.only] if args.only else ["screen", "confirm"]:
        cv = cross_validate(spec, split, role, args)
        oof[role] = cv
        meta = metadata(spec, role, cv, split, args)
        log.info("%s cross-validation: %s", role, json.dumps(meta["eval_metrics"]))
        if args.cv_only:
            continue
        seed_everything(args.seed)
        network, _ = train_network(
            role, split.images, split.labels, args.size, args.epochs[role], args.init[role]
        )
        out = args.out / meta["name"]
        _, network_def, _ = NETWORKS[role]
        write_bundle(out, meta, network_def, network.state_dict(), model_card(spec, role, meta))
        reference.write_reference(out, drift_reference(spec, role, oof, args.folds))
        log.info("%s written to %s", role, out)


def drift_reference(
    spec: FindingSpec, role: str, oof: dict[str, dict[str, Any]], folds: int
) -> dict[str, Any]:
    """The finding's probability over the pooled out-of-fold predictions. The confirm's
    is the cascade's final probability (confirm where the screen passed the image on,
    else the screen's) when the screen was cross-validated in the same run. No gate
    distance or refusals: this finding runs behind the pneumonia screen's gate."""
    probs = oof[role]["oof_probabilities"]
    if role == "confirm" and "screen" in oof:
        screen = oof["screen"]["oof_probabilities"]
        probs = np.where(screen >= oof["screen"]["threshold"], probs, screen)
    data = (
        f"{spec.data_source}: {len(probs)} images, pooled out-of-fold predictions of the "
        f"{folds}-fold cross-validation"
        + (" (screen -> confirm as the cascade)" if role == "confirm" and "screen" in oof else "")
    )
    signals = reference.outcome_signals(spec.code, [float(p) for p in probs])
    return reference.build_reference(signals, data)


if __name__ == "__main__":
    main()
