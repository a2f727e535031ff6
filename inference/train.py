"""Train the screen (MobileNetV3) and confirm (ResNet-18) bundles from scratch.

One seeded command reproduces both shipped bundles::

    python -m inference.train --data ../shared/data/kermany-train

Validation is split by patient (images of one child never straddle the split), the class
imbalance (about 3 pneumonia : 1 normal) is handled with a positive-class weight whose
bias is removed again at calibration, augmentation uses the shared MONAI chain, the
temperature and thresholds are fitted on validation, and the bundles are written with
their model cards and the drift reference of the node's cascade on the validation split.
"""

from __future__ import annotations

import argparse
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

from inference import evaluate, gate, reference
from inference.bundle import (
    CONFIRM_BUNDLE,
    SCREEN_BUNDLE,
    Calibration,
    build_network,
    network_data_format,
    write_bundle,
)
from inference.datasets import Split, load_adults, load_kermany
from inference.preprocess import INPUT_SIZE, KEY, inference_transforms, training_transforms

log = logging.getLogger("inference.train")

PNEUMONIA = {"name": "pneumonia", "code": "233604007", "scheme": "SCT", "meaning": "Pneumonia"}
PEDIATRIC = {  # the training data's population (inference.population reads it)
    "age_years": [1, 5],
    "views": ["PA", "AP"],
    "modalities": ["CR", "DX"],
    "unknown_age": "not_assessed",
    "description": "children aged 1-5 years (Kermany et al.: pediatric patients aged 1 to 5 "
    "from one hospital)",
}
SCREEN_SENSITIVITY = 0.985  # margin above the 0.97 the screen must keep on unseen data


@dataclass(frozen=True)
class Arch:
    role: str
    bundle: Path
    title: str
    network_def: dict[str, Any]
    lr: float
    epochs: int


ARCHS = {
    "screen": Arch(
        "screen",
        SCREEN_BUNDLE,
        "MobileNetV3-Small",
        {"_target_": "inference.networks.MobileNetV3", "in_channels": 1, "num_classes": 1},
        lr=3e-3,
        epochs=10,
    ),
    "confirm": Arch(
        "confirm",
        CONFIRM_BUNDLE,
        "ResNet-18 (MONAI, half width)",
        {"_target_": "inference.networks.resnet18", "in_channels": 1, "num_classes": 1},
        lr=2e-3,
        epochs=6,
    ),
}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    monai.utils.set_determinism(seed=seed)


class RadiographDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """8-bit display images through the shared chain (with augmentation when training)."""

    def __init__(self, split: Split, train: bool) -> None:
        self.split = split
        self.transforms = training_transforms() if train else inference_transforms()

    def __len__(self) -> int:
        return len(self.split.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        display = self.split.images[i].astype(np.float32) / 255.0
        image = torch.as_tensor(self.transforms({KEY: display})[KEY])
        return image, torch.tensor([self.split.labels[i]])


def predict(network: nn.Module, split: Split, batch: int = 64) -> np.ndarray:
    """Logits for a split, without augmentation."""
    return _run_split(network, split, lambda images: network(images).squeeze(1), batch)[0]


def embed_and_probe(network: nn.Module, split: Split) -> tuple[np.ndarray, list[np.ndarray]]:
    """Pooled features and each probe block's statistics of a screen network for a split."""

    def flat(images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        embedding, probes = network.embed_and_probe(images)  # type: ignore[operator]
        return (embedding, *probes)

    embedding, *probes = _run_split(network, split, flat)
    return embedding, probes


def _run_split(
    network: nn.Module, split: Split, fn: Any, batch: int = 64
) -> tuple[np.ndarray, ...]:
    loader = DataLoader(RadiographDataset(split, train=False), batch_size=batch)
    outputs: list[tuple[torch.Tensor, ...]] = []
    network.eval()
    with torch.no_grad():
        for images, _ in loader:
            out = fn(images)
            outputs.append(out if isinstance(out, tuple) else (out,))
    return tuple(torch.cat(parts).double().numpy() for parts in zip(*outputs, strict=True))


def train_network(
    arch: Arch, train: Split, val: Split, epochs: int, workers: int
) -> tuple[nn.Module, float]:
    """The best-validation-AUROC network and the positive-class weight it was trained with."""
    network = build_network(arch.network_def)
    n_pos = float(train.labels.sum())
    pos_weight = torch.tensor([(len(train.labels) - n_pos) / n_pos])
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    loader = DataLoader(
        RadiographDataset(train, train=True),
        batch_size=32,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        persistent_workers=workers > 0,
    )
    opt = torch.optim.AdamW(network.parameters(), lr=arch.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=arch.lr, total_steps=epochs * len(loader), pct_start=0.2
    )
    best_auc, best_state = -1.0, None
    for epoch in range(epochs):
        start = time.time()
        loss = run_epoch(network, loader, loss_fn, opt, sched)
        val_auc = evaluate.auroc(val.labels, predict(network, val))
        log.info(
            "%s epoch %d/%d loss %.4f val_auroc %.4f (%.0fs)",
            arch.role,
            epoch + 1,
            epochs,
            loss,
            val_auc,
            time.time() - start,
        )
        if val_auc >= best_auc:
            best_auc = val_auc
            best_state = {k: v.detach().clone() for k, v in network.state_dict().items()}
    assert best_state is not None
    network.load_state_dict(best_state)
    network.eval()
    return network, float(pos_weight)


def run_epoch(
    network: nn.Module,
    loader: DataLoader[tuple[torch.Tensor, torch.Tensor]],
    loss_fn: nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
) -> float:
    """One pass over ``loader`` in training mode; the mean loss."""
    network.train()
    total = 0.0
    for images, labels in loader:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(network(images), labels)
        loss.backward()
        opt.step()
        sched.step()
        total += loss.item()
    return total / len(loader)


def calibrate_and_threshold(
    arch: Arch, network: nn.Module, pos_weight: float, val: Split
) -> tuple[dict[str, float], float, dict[str, Any]]:
    logits = predict(network, val)
    offset = -math.log(pos_weight)
    temperature = evaluate.fit_temperature(logits + offset, val.labels)
    probs = Calibration(temperature, offset).apply(torch.as_tensor(logits)).numpy()
    if arch.role == "screen":
        threshold = evaluate.threshold_for_sensitivity(val.labels, probs, SCREEN_SENSITIVITY)
    else:
        threshold = evaluate.threshold_youden(val.labels, probs)
    metrics = evaluate.binary_metrics(val.labels, probs, threshold).as_dict()
    metrics["ece_uncalibrated"] = round(
        evaluate.expected_calibration_error(val.labels, 1 / (1 + np.exp(-logits))), 4
    )
    calibration = {"temperature": round(temperature, 5), "logit_offset": round(offset, 5)}
    return calibration, threshold, metrics


def metadata_for(
    arch: Arch,
    calibration: dict[str, float],
    threshold: float,
    metrics: dict[str, Any],
    train: Split,
    val: Split,
    seed: int,
    version: str,
) -> dict[str, Any]:
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/"
        "0.8.1/meta_schema_20220324.json",
        "name": arch.bundle.name,
        "version": version,
        "changelog": {version: "first release: trained from scratch on Kermany et al. v2"},
        "role": arch.role,
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "pydicom_version": pydicom.__version__,
        "task": f"Pneumonia {arch.role} on frontal chest radiographs ({arch.title})",
        "description": "Binary pneumonia classifier for frontal chest radiographs.",
        "authors": "CXR AI node maintainers",
        "copyright": "Weights: Apache-2.0. Training data: CC BY 4.0, Kermany et al.",
        "data_source": "Kermany D, Zhang K, Goldbaum M. Labeled Optical Coherence Tomography "
        "(OCT) and Chest X-Ray Images for Classification. Mendeley Data v2, "
        "doi:10.17632/rscbjbr9sj.2 (training split)",
        "data_type": "jpeg",
        "intended_use": "Worklist triage support; not a diagnosis.",
        "population": PEDIATRIC,
        "finding": "pneumonia",
        "labels": [PNEUMONIA],
        "thresholds": {"pneumonia": round(threshold, 5)},
        "calibration": calibration,
        "eval_metrics": {"validation": metrics},
        "training": {
            "seed": seed,
            "train_images": int(len(train.labels)),
            "train_patients": len(set(train.patients)),
            "val_images": int(len(val.labels)),
            "val_patients": len(set(val.patients)),
            "trained_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        },
        "network_data_format": network_data_format(INPUT_SIZE, "pneumonia"),
    }


def model_card(arch: Arch, meta: dict[str, Any]) -> str:
    m = meta["eval_metrics"]["validation"]
    t = meta["training"]
    return f"""# {meta["name"]} {meta["version"]}

{arch.title}, single-channel input {INPUT_SIZE}×{INPUT_SIZE}, role: **{arch.role}** in the
node's cascade (screen: every eligible image; confirm: images above the screen threshold).

## Intended use
Prioritising chest radiographs on a radiology worklist by the probability of pneumonia.
Decision support for trained readers; **not** a diagnosis and not for use without a
radiologist's read. Frontal (PA/AP) chest radiographs only; the node's input gate refuses
other body parts, lateral views and images far from the training features.

## Training data
Kermany D, Zhang K, Goldbaum M (2018), *Labeled Optical Coherence Tomography (OCT) and
Chest X-Ray Images for Classification*, Mendeley Data v2, doi:10.17632/rscbjbr9sj.2,
licence CC BY 4.0 — training split only: {t["train_images"]} images of
{t["train_patients"]} patients for training, {t["val_images"]} images of
{t["val_patients"]} patients for validation (split by patient, stratified by label).
Pediatric patients (1–5 years) from Guangzhou Women and Children's Medical Center.
Trained from scratch (no ImageNet weights), seed {t["seed"]}, with MONAI augmentation
(affine, contrast, blur, noise) and a positive-class weight for the 3:1 imbalance.

## Validation metrics (patient-level validation split)
| metric | value |
|---|---|
| AUROC | {m["auroc"]} |
| threshold | {m["threshold"]} |
| sensitivity at threshold | {m["sensitivity"]} |
| specificity at threshold | {m["specificity"]} |
| expected calibration error (15 bins, after temperature scaling) | {m["ece"]} |
| ECE before calibration | {m["ece_uncalibrated"]} |
| prevalence | {m["prevalence"]} |

Calibration: p = sigmoid((logit + {meta["calibration"]["logit_offset"]}) /
{meta["calibration"]["temperature"]}); the offset removes the class weighting, the
temperature is fitted on the validation split (so the ECE above is in-sample for that one
parameter).

## Limitations
- Pediatric training data: adults, portable AP films, devices and other pathologies are
  under-represented; probabilities on adults are less reliable.
- Calibrated at the training prevalence (about 74 % pneumonia); at a hospital's lower
  prevalence the same score corresponds to a lower post-test probability.
- Bacterial vs viral pneumonia is not distinguished; other findings are not detected.
- The official Kermany test split was not used for any choice made here.

## Drift reference
`configs/reference.json`: the node's cascade (screen → confirm behind the feature gate)
on the validation split above — the finding's probability, the gate distance and the
refused share, binned at their own deciles (`inference/reference.py`). No header
descriptor: the JPEG training data records none.
"""


def train_role(arch: Arch, train: Split, val: Split, args: argparse.Namespace) -> dict[str, Any]:
    epochs = args.epochs or arch.epochs
    network, pos_weight = train_network(arch, train, val, epochs, args.workers)
    calibration, threshold, metrics = calibrate_and_threshold(arch, network, pos_weight, val)
    meta = metadata_for(arch, calibration, threshold, metrics, train, val, args.seed, args.version)
    gate_stats, gate_info = (
        fit_screen_gate(network, train, val, [a for a in map(load_adults, args.adults or []) if a])
        if arch.role == "screen"
        else (None, None)
    )
    out = Path(args.out) / arch.bundle.name if args.out else arch.bundle
    write_bundle(
        out,
        meta,
        arch.network_def,
        network.state_dict(),
        model_card(arch, meta),
        gate_stats,
        gate_info,
    )
    log.info("%s written to %s: %s", arch.role, out, json.dumps(metrics))
    return metrics


def fit_screen_gate(
    network: nn.Module, train: Split, val: Split, adults: Split | list[Split] | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Gate statistics from the screen's features.

    Reference: the training images plus every other image of each adult chest set;
    threshold per probe block: a high quantile of the held-out distances (pediatric
    validation plus the other adults), so adult chests are in-domain for the gate even
    though the pneumonia classifier saw none. The polarity probe learns from a third of
    the training images, inverted.
    """
    train_embed, reference = embed_and_probe(network, train)
    held_out = embed_and_probe(network, val)[1]
    info: dict[str, Any] = {"reference": f"{len(train.labels)} Kermany training images"}
    for group in [adults] if isinstance(adults, Split) else adults or []:
        adult_probes = embed_and_probe(network, group)[1]
        reference = [np.vstack([r, a[0::2]]) for r, a in zip(reference, adult_probes, strict=True)]
        held_out = [np.vstack([h, a[1::2]]) for h, a in zip(held_out, adult_probes, strict=True)]
        info["reference"] += f" + {len(adult_probes[0][0::2])} adult chest images"
    subset = slice(None, None, 3)
    inverted = Split(255 - train.images[subset], train.labels[subset], train.patients[subset])
    distance = [gate.fit_distance(r, h) for r, h in zip(reference, held_out, strict=True)]
    stats: dict[str, Any] = {
        "blocks": torch.tensor(network.probe_blocks),
        "distance": distance,
        **gate.fit_polarity(train_embed[subset], embed_and_probe(network, inverted)[0]),
    }
    info.update(
        features=f"mean and std of MobileNetV3 blocks {stats['blocks'].tolist()}",
        thresholds=[round(float(d["threshold"]), 3) for d in distance],
        quantile=gate.DISTANCE_QUANTILE,
        held_out_images=int(len(held_out[0])),
    )
    return stats, info


def refit_gate(args: argparse.Namespace) -> None:
    """Recompute only the gate of an existing screen bundle (same network, same split)."""
    from inference.bundle import load_bundle, replace_gate

    path = Path(args.out) / SCREEN_BUNDLE.name if args.out else SCREEN_BUNDLE
    bundle = load_bundle(path)
    train, val = load_kermany(args.data, args.limit)
    adults = [load_adults(folder) for folder in args.adults or []]
    stats, info = fit_screen_gate(bundle.network, train, val, [a for a in adults if a])
    replace_gate(path, stats, info)
    log.info("gate of %s refitted: %s", path, json.dumps(info))
    write_references(args, val, ["screen", "confirm"])  # the gate distances changed


def write_references(args: argparse.Namespace, val: Split, roles: list[str]) -> None:
    """The drift references (:mod:`inference.reference`) of the bundles of ``roles``:
    the node's cascade — both bundles of the output folder — run on the validation split,
    so the reference holds what the node itself reports (the final probability whichever
    stage made it, the gate distance), which neither network's logits alone give."""
    paths = {
        role: Path(args.out) / a.bundle.name if args.out else a.bundle for role, a in ARCHS.items()
    }
    if not all((path / "configs" / "metadata.json").is_file() for path in paths.values()):
        log.warning("no drift reference: the cascade needs a screen and a confirm bundle")
        return
    description = reference.kermany_description(len(val.labels), len(set(val.patients)))
    references = reference.cascade_references(
        paths["screen"], paths["confirm"], list(val.images), description
    )
    for role, ref in zip(("screen", "confirm"), references, strict=True):
        if role in roles:
            reference.write_reference(paths[role], ref)
            log.info("%s drift reference: %s", role, reference.summary(ref))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path, help="kermany-train folder")
    parser.add_argument("--only", choices=sorted(ARCHS), help="train one role only")
    parser.add_argument("--epochs", type=int, help="override the per-network epoch count")
    parser.add_argument("--limit", type=int, help="use only N images (smoke tests)")
    parser.add_argument("--out", help="write bundles under this folder instead of the package")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--version", default="1.0.0")
    parser.add_argument("--workers", type=int, default=1, help="data loader processes")
    parser.add_argument(
        "--adults",
        type=Path,
        nargs="*",
        help="adult chest folders for the gate reference (nih-sample, nih-pneumonia, "
        "tb-sakha, cxr-anatomy)",
    )
    parser.add_argument("--gate-only", action="store_true", help="refit the screen's gate only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    seed_everything(args.seed)
    if args.gate_only:
        refit_gate(args)
        return
    train, val = load_kermany(args.data, args.limit)
    log.info("train %d images, validation %d images", len(train.labels), len(val.labels))
    roles = [args.only] if args.only else ["screen", "confirm"]
    for role in roles:
        seed_everything(args.seed)
        train_role(ARCHS[role], train, val, args)
    write_references(args, val, roles)


if __name__ == "__main__":
    main()
