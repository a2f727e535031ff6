"""Train the heart/lung segmentation bundle (MONAI UNet) with 5-fold cross-validation.

One seeded command reproduces the shipped bundle::

    python -m inference.train_segment --data ../shared/data/cxr-anatomy

The images are one per patient, so folds are by image. For each fold a UNet is trained
from scratch on the other folds for a fixed number of epochs (no early stopping on the
held-out fold) with MONAI augmentation (affine, contrast, noise) and the serving chain's
intensity normalisation; the held-out images are then segmented at the working grid,
resampled to the masks' own 512 grid and scored: Dice per structure, the cardiothoracic
ratio against the dataset's, cardiomegaly AUROC by the ratio. The out-of-fold ratios of
all folds are pooled for the cardiomegaly calibration (a logistic fit of the label on the
ratio), which the bundle carries, and for the drift reference (the out-of-fold
cardiomegaly probabilities and unmeasurable shares). A final network is trained on all
images with the same recipe and written as the bundle, with its card.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from monai.transforms import (
    Compose,
    RandAdjustContrastd,
    RandAffined,
    RandGaussianNoised,
    RandScaleIntensityd,
)
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from inference import anatomy, evaluate, reference
from inference.bundle import build_network, network_data_format, write_bundle
from inference.manifest import SEGMENT_BUNDLE
from inference.preprocess import KEY, intensity_steps
from inference.train import run_epoch, seed_everything

log = logging.getLogger("inference.train_segment")

LABEL = "label"
NETWORK_DEF: dict[str, Any] = {
    "_target_": "monai.networks.nets.UNet",
    "spatial_dims": 2,
    "in_channels": 1,
    "out_channels": 3,
    "channels": [8, 16, 32, 64, 128],
    "strides": [2, 2, 2, 2],
    "num_res_units": 1,
}
ADULTS = {  # the training data's population (inference.population reads it)
    "age_years": [18, 120],
    "views": ["PA", "AP"],
    "modalities": ["CR", "DX"],
    "unknown_age": "assess",
}


def load(root: Path) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Names, images (N×512×512 float in [0, 1]), masks (N×3×512×512 bool), dataset CTR
    (NaN where the dataset gives none)."""
    names, images, masks, ctrs = [], [], [], []
    with (root / "labels.csv").open() as fh:
        for row in csv.DictReader(fh):
            names.append(Path(row["image"]).name)
            images.append(np.asarray(Image.open(root / row["image"]).convert("L"), np.float32))
            masks.append(
                np.stack(
                    [
                        np.asarray(Image.open(root / row[s.name]).convert("L")) > 127
                        for s in anatomy.STRUCTURES
                    ]
                )
            )
            ctrs.append(float(row["ctr"]) if row["ctr"] else np.nan)
    return names, np.stack(images) / 255.0, np.stack(masks), np.array(ctrs)


def to_grid(images: np.ndarray, masks: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Area-resample images (as serving's Resized does) and masks to the working grid."""
    img = F.interpolate(torch.as_tensor(images)[:, None], size=(size, size), mode="area")
    msk = F.interpolate(torch.as_tensor(masks).float(), size=(size, size), mode="area")
    return img.numpy(), (msk >= 0.5).float().numpy()


class _Pairs(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Image/mask pairs on the working grid, augmented together when training."""

    def __init__(self, images: np.ndarray, masks: np.ndarray, train: bool) -> None:
        self.images, self.masks = images, masks
        steps: list[Any] = []
        if train:
            steps = [
                RandAffined(
                    [KEY, LABEL],
                    prob=0.8,
                    rotate_range=np.deg2rad(10),
                    scale_range=(0.1, 0.1),
                    translate_range=(16, 16),
                    mode=("bilinear", "nearest"),
                    padding_mode="border",
                ),
                RandAdjustContrastd(KEY, prob=0.5, gamma=(0.6, 1.6)),
                RandScaleIntensityd(KEY, prob=0.3, factors=0.2),
                RandGaussianNoised(KEY, prob=0.3, std=0.02),
            ]
        self.transforms = Compose([*steps, *intensity_steps()])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.transforms({KEY: self.images[i], LABEL: self.masks[i]})
        return torch.as_tensor(out[KEY]), torch.as_tensor(np.asarray(out[LABEL]))


def train_network(images: np.ndarray, masks: np.ndarray, epochs: int, seed: int) -> nn.Module:
    seed_everything(seed)
    network = build_network(NETWORK_DEF)
    loader = DataLoader(_Pairs(images, masks, True), batch_size=8, shuffle=True, drop_last=True)
    loss_fn = DiceCELoss(sigmoid=True)
    opt = torch.optim.AdamW(network.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=3e-3, total_steps=epochs * len(loader), pct_start=0.1
    )
    for epoch in range(epochs):
        start = time.time()
        loss = run_epoch(network, loader, loss_fn, opt, sched)
        log.info("epoch %d/%d loss %.4f (%.0fs)", epoch + 1, epochs, loss, time.time() - start)
    return network.eval()


def predict(network: nn.Module, images: np.ndarray, out_size: int) -> np.ndarray:
    """Post-processed masks at ``out_size`` (probabilities resampled, then thresholded)."""
    loader = DataLoader(_Pairs(images, np.zeros((len(images), 3, 1, 1)), False), batch_size=16)
    out: list[np.ndarray] = []
    with torch.no_grad():
        for x, _ in loader:
            prob = torch.sigmoid(network(x))
            prob = F.interpolate(
                prob, size=(out_size, out_size), mode="bilinear", align_corners=False
            )
            out.extend(anatomy.postprocess(p) for p in prob.numpy())
    return np.stack(out)


def fold_scores(pred: np.ndarray, truth: np.ndarray, ctr: np.ndarray) -> dict[str, Any]:
    """Dice per structure and CTR error for one fold's held-out images."""
    scores: dict[str, Any] = {
        f"dice_{s.name}": float(
            np.mean([anatomy.dice(p[c], t[c]) for p, t in zip(pred, truth, strict=True)])
        )
        for c, s in enumerate(anatomy.STRUCTURES)
    }
    ratios = np.array([anatomy.ctr_of(p) or np.nan for p in pred])
    known = ~np.isnan(ctr)
    scores["ctr_mae"] = float(np.nanmean(np.abs(ratios[known] - ctr[known])))
    scores["implausible"] = int(sum(anatomy.implausible(p) is not None for p in pred))
    labels = (ctr[known] > 0.5).astype(int)
    if 0 < labels.sum() < len(labels):
        scores["cardiomegaly_auroc"] = evaluate.auroc(labels, np.nan_to_num(ratios[known]))
    return scores


def fit_logistic(ratios: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """``p = sigmoid(a * ctr + b)`` by Newton's method (two parameters, tiny data)."""
    x = np.stack([ratios, np.ones_like(ratios)], axis=1)
    w = np.zeros(2)
    for _ in range(100):
        p = 1 / (1 + np.exp(-(x @ w)))
        grad = x.T @ (p - labels) + 1e-3 * w
        hess = (x * (p * (1 - p))[:, None]).T @ x + 1e-3 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-9:
            break
    return float(w[0]), float(w[1])


def mean_sd(values: list[float]) -> dict[str, float]:
    return {"mean": round(float(np.mean(values)), 4), "sd": round(float(np.std(values, ddof=1)), 4)}


def cross_validate(
    images: np.ndarray, masks: np.ndarray, ctr: np.ndarray, args: argparse.Namespace
) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Per-fold scores, every image's out-of-fold CTR and whether its out-of-fold masks
    are measurable (plausible, as serving requires)."""
    grid_images, grid_masks = to_grid(images, masks, args.size)
    order = np.random.default_rng(args.seed).permutation(len(images))
    folds = np.array_split(order, args.folds)
    oof = np.full(len(images), np.nan)
    measurable = np.zeros(len(images), dtype=bool)
    per_fold = []
    for k, held in enumerate(folds):
        cache = args.work / f"fold{k}.npz"
        if cache.is_file():
            pred = np.load(cache)["pred"]
        else:
            train = np.setdiff1d(order, held)
            net = train_network(grid_images[train], grid_masks[train], args.epochs, args.seed + k)
            pred = predict(net, grid_images[held], masks.shape[-1])
            np.savez_compressed(cache, pred=pred)
        scores = fold_scores(pred, masks[held], ctr[held])
        oof[held] = [anatomy.ctr_of(p) or np.nan for p in pred]
        measurable[held] = [anatomy.implausible(p) is None for p in pred]
        log.info("fold %d: %s", k + 1, json.dumps(scores))
        per_fold.append(scores)
    summary: dict[str, Any] = {
        key: mean_sd([f[key] for f in per_fold if key in f]) for key in per_fold[0]
    }
    summary["folds"] = per_fold
    return summary, oof, measurable


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/cxr-anatomy"))
    parser.add_argument("--out", type=Path, default=SEGMENT_BUNDLE)
    parser.add_argument("--work", type=Path, default=Path("runs/segment"))
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--size", type=int, default=anatomy.SEGMENT_SIZE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--limit", type=int, default=0, help="first N images (smoke runs)")
    parser.add_argument("--cv-only", action="store_true")
    parser.add_argument(
        "--final-only",
        action="store_true",
        help="only train the final network into WORK/final.pt (run beside the folds)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    names, images, masks, ctr = load(args.data)
    if args.limit:
        images, masks, ctr = images[: args.limit], masks[: args.limit], ctr[: args.limit]
    if args.final_only:
        final_network(images, masks, args)
        return
    summary, oof, measurable = cross_validate(images, masks, ctr, args)
    known = ~np.isnan(ctr) & ~np.isnan(oof)
    labels = (ctr[known] > 0.5).astype(float)
    slope, intercept = fit_logistic(oof[known], labels)
    probs = 1 / (1 + np.exp(-(slope * oof[known] + intercept)))
    summary["cardiomegaly_calibration"] = {
        "n": int(known.sum()),
        "positives": int(labels.sum()),
        "ece_pooled_out_of_fold": round(evaluate.expected_calibration_error(labels, probs), 4),
    }
    (args.work / "cv.json").write_text(json.dumps(summary, indent=2) + "\n")
    log.info("cross-validation: %s", json.dumps({k: v for k, v in summary.items() if k != "folds"}))
    if args.cv_only:
        return
    network = final_network(images, masks, args)
    meta = metadata(args, summary, len(images), slope, intercept)
    write_bundle(args.out, meta, NETWORK_DEF, network.state_dict(), model_card(meta))
    reference.write_reference(args.out, drift_reference(oof, measurable, meta))
    log.info("wrote %s", args.out)


def drift_reference(
    oof: np.ndarray, measurable: np.ndarray, meta: dict[str, Any]
) -> dict[str, Any]:
    """The drift reference from the out-of-fold measurements: the cardiomegaly
    probability by the bundle's own logistic, and the share of unmeasurable masks."""
    logistic = meta["cardiomegaly"]["logistic"]
    assessed = measurable & ~np.isnan(oof)
    probs = 1 / (1 + np.exp(-(logistic["slope"] * oof + logistic["intercept"])))
    signals = reference.outcome_signals(
        meta["cardiomegaly"]["code"],
        [float(p) if a else None for p, a in zip(probs, assessed, strict=True)],
        refused=[not a for a in assessed],
    )
    data = (
        f"cxr-anatomy (Wingspan CTR set): {len(oof)} images, out-of-fold predictions of the "
        f"{meta['training']['folds']} cross-validation networks (each image segmented by a "
        "network that did not train on it)"
    )
    return reference.build_reference(signals, data)


def final_network(images: np.ndarray, masks: np.ndarray, args: argparse.Namespace) -> nn.Module:
    """The network trained on every image (cached in WORK/final.pt)."""
    cache = args.work / "final.pt"
    if cache.is_file():
        network = build_network(NETWORK_DEF)
        network.load_state_dict(torch.load(cache, weights_only=True))
        return network.eval()
    grid_images, grid_masks = to_grid(images, masks, args.size)
    network = train_network(grid_images, grid_masks, args.epochs, args.seed)
    torch.save(network.state_dict(), cache)
    return network


def metadata(
    args: argparse.Namespace, summary: dict[str, Any], n: int, slope: float, intercept: float
) -> dict[str, Any]:
    import monai

    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json",
        "name": "cxr_anatomy_segment_unet",
        "version": "1.0.0",
        "changelog": {"1.0.0": "first release: trained from scratch on the Wingspan CTR set"},
        "role": "segment",
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "task": "Heart, right lung and left lung segmentation of frontal adult chest radiographs",
        "description": "MONAI UNet, three sigmoid channels (heart, right lung, left lung).",
        "authors": "CXR AI node maintainers",
        "copyright": "Weights: Apache-2.0. Training data: MIT (c) 2020 Nanqing Dong "
        "(Wingspan CTR set).",
        "data_source": "Dong N. et al., Unsupervised domain adaptation for automatic estimation of "
        "cardiothoracic ratio, MICCAI 2018 (and MICCAI 2019): the Wingspan CTR set",
        "data_type": "png",
        "intended_use": "Anatomy measurements (cardiothoracic ratio, lung areas) for worklist "
        "support; not a diagnosis.",
        "population": {**ADULTS, "description": "adults, frontal (PA/AP) radiographs"},
        "labels": [
            {"name": s.name, "code": s.code, "scheme": "SCT", "meaning": s.meaning}
            for s in anatomy.STRUCTURES
        ],
        "thresholds": {s.name: 0.5 for s in anatomy.STRUCTURES},
        "calibration": {"temperature": 1.0, "logit_offset": 0.0},
        "cardiomegaly": {
            "code": "8186001",
            "scheme": "SCT",
            "meaning": "Cardiomegaly",
            "logistic": {"slope": round(slope, 5), "intercept": round(intercept, 5)},
            "ratio_threshold": 0.5,
        },
        "eval_metrics": {"cross_validation": summary},
        "training": {
            "seed": args.seed,
            "images": n,
            "folds": args.folds,
            "epochs": args.epochs,
            "trained_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        },
        "network_data_format": network_data_format(
            args.size,
            "",
            {
                "pred": {
                    "type": "probabilities",
                    "format": "segmentation",
                    "num_channels": 3,
                    "spatial_shape": [args.size, args.size],
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": False,
                    "channel_def": {str(i): s.name for i, s in enumerate(anatomy.STRUCTURES)},
                }
            },
        ),
    }


def model_card(meta: dict[str, Any]) -> str:
    cv = meta["eval_metrics"]["cross_validation"]

    def fmt(key: str) -> str:
        return f"{cv[key]['mean']:.3f} ± {cv[key]['sd']:.3f}" if key in cv else "not measured"

    cal = cv["cardiomegaly_calibration"]
    logistic = meta["cardiomegaly"]["logistic"]
    return f"""# {meta["name"]} {meta["version"]}

{meta["task"]}. {meta["description"]}

## Data and licence
{meta["data_source"]}. 199 adult frontal radiographs (512×512, stretched to a square
upstream), one per patient, with heart, left-lung and right-lung masks and the dataset's
cardiothoracic ratio (161 images). Licence of the data: MIT (c) 2020 Nanqing Dong.
Weights: Apache-2.0, trained from scratch here (no pretrained weights).

## Training
MONAI UNet (channels {NETWORK_DEF["channels"]}, one residual unit per level) at
{meta["network_data_format"]["inputs"]["image"]["spatial_shape"][0]}² (whole image
stretched, area resampling), Dice + cross-entropy on three sigmoid channels,
{meta["training"]["epochs"]} epochs, AdamW with one-cycle schedule, augmentation: affine
(±10°, ±10 % scale, ±16 px), gamma, intensity scale, noise. Intensity: 1–99 percentile
stretch and per-image standardisation (the serving chain). Post-processing: largest
component per structure, holes filled. Seed {meta["training"]["seed"]}.

## Cross-validated figures ({meta["training"]["folds"]} folds by image, mean ± sd over folds)
Scored on each fold's held-out images, masks resampled to the 512 grid:

| | |
|---|---|
| Dice heart | {fmt("dice_heart")} |
| Dice right lung | {fmt("dice_right_lung")} |
| Dice left lung | {fmt("dice_left_lung")} |
| CTR mean absolute error (vs the dataset's ratio) | {fmt("ctr_mae")} |
| Cardiomegaly AUROC by CTR (label: dataset CTR > 0.5) | {fmt("cardiomegaly_auroc")} |
| Images with implausible masks (per fold) | {fmt("implausible")} |

Cardiomegaly probability: logistic fit on the pooled out-of-fold ratios
(n = {cal["n"]}, {cal["positives"]} with cardiomegaly): p = sigmoid({logistic["slope"]} ×
CTR + {logistic["intercept"]}); ECE of the pooled out-of-fold probabilities
{cal["ece_pooled_out_of_fold"]}. The label is the dataset's own CTR > 0.5, not a
clinical diagnosis.

## Limits
- Adults, frontal views; one data source (its scanners, its population). Not validated
  on children, laterals, or images with devices, effusions or collapse that hide the
  borders.
- The ratio is a width ratio on a projection radiograph: on AP films the heart is
  magnified, so the node does not call cardiomegaly on AP views (documented in the README).
- Widths and areas in mm/cm² are at the detector plane (magnified), from the header's
  pixel spacing.

## Drift reference
`configs/reference.json`: the cardiomegaly probability and the share of unmeasurable
masks over the out-of-fold predictions of the cross-validation, binned at their own
deciles (`inference/reference.py`). No header descriptor: the PNG data records none.
"""


if __name__ == "__main__":
    main()
