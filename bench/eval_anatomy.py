"""What the anatomy changes, measured on the shared data (not a speed benchmark).

    python bench/eval_anatomy.py [--data ../shared/data] [--kermany 400] [--out FILE]

* **Lung gate**: the share of each chest set refused because the segmentation finds no
  plausible pair of lungs (every image here is a chest: each refusal is a loss), and what
  happens to the non-chest negatives of ``dicom/`` (through the whole cascade, header
  rules first).
* **Explanation check**: the distribution (quartiles, share below the warning level) of
  the Grad-CAM mass inside the lung fields and inside the heart, for the pneumonia
  network's heatmap on ``kermany-train`` (inside its population) and on ``nih-sample``
  (adults: outside it, so the node would not show this heatmap; measured to see where
  the network looks on adult films).
* **Cardiomegaly on an independent set**: on ``nih-sample`` PA films, the AUROC of the
  measured ratio against the NIH "Cardiomegaly" label (few positives: indicative only).
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inference import evaluate  # noqa: E402
from inference.cascade import Cascade, ImageResult  # noqa: E402
from inference.decode import DecodedImage  # noqa: E402
from inference.population import ImageFacts  # noqa: E402

LUNG_GATE = "no plausible pair of lung fields"


def images_of(folder: Path, column: str, limit: int | None, seed: int = 0) -> list[Path]:
    with (folder / "labels.csv").open() as fh:
        rows = [folder / r[column] for r in csv.DictReader(fh)]
    if limit and len(rows) > limit:
        rows = random.Random(seed).sample(rows, limit)
    return rows


def decoded(path: Path) -> DecodedImage:
    pixels = np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255.0
    return DecodedImage(pixels, None, None, "png")


def run_set(cascade: Cascade, paths: list[Path], batch: int = 16) -> list[ImageResult]:
    results: list[ImageResult] = []
    for start in range(0, len(paths), batch):
        chunk = [decoded(p) for p in paths[start : start + batch]]
        results += cascade.analyze_pixels(chunk)
    return results


def summary(results: list[ImageResult], warn_below: float) -> dict[str, Any]:
    refused = [r for r in results if LUNG_GATE in r.reason]
    feature = [r for r in results if r.reason.startswith("image features far")]
    lung = [f.cam_lung_share for r in results for f in r.findings if f.cam_lung_share is not None]
    heart = [
        f.cam_heart_share for r in results for f in r.findings if f.cam_heart_share is not None
    ]
    out: dict[str, Any] = {
        "n": len(results),
        "lung_gate_refused": len(refused),
        "lung_gate_refused_pct": round(100 * len(refused) / max(1, len(results)), 2),
        "feature_gate_refused": len(feature),
        "anatomy_not_measurable": sum(
            1 for r in results if r.anatomy is not None and not r.anatomy.assessed
        ),
    }
    if lung:
        quartiles = np.quantile(lung, [0.25, 0.5, 0.75])
        out["cam_lung_share_quartiles"] = [round(float(q), 3) for q in quartiles]
        out["cam_lung_share_below_warning_pct"] = round(
            100 * float(np.mean(np.array(lung) < warn_below)), 1
        )
        out["cam_heart_share_median"] = round(float(np.median(heart)), 3)
    return out


def non_chest(cascade: Cascade, folder: Path) -> list[dict[str, str]]:
    with (folder / "manifest.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    out = []
    for row in rows:
        name = row.get("file") or row.get("path") or next(iter(row.values()))
        path = folder / name
        if not path.is_file() or path.suffix != ".dcm":
            continue
        ds = pydicom.dcmread(path)
        if "PixelData" not in ds:
            continue
        result = cascade.analyze([ds])[0]
        out.append({"file": name, "status": result.status, "reason": result.reason[:120]})
    return out


def nih_cardiomegaly(cascade: Cascade, folder: Path) -> dict[str, Any]:
    with (folder / "labels.csv").open() as fh:
        rows = [r for r in csv.DictReader(fh) if r["view"] == "PA"]
    ratios, labels = [], []
    for row in rows:
        image = decoded(folder / row["image"])
        facts = ImageFacts(float(row["age"]), "PA", "DX")
        result = cascade.analyze_pixels([image], facts=[facts])[0]
        if result.anatomy is not None and result.anatomy.ctr is not None:
            ratios.append(result.anatomy.ctr)
            labels.append("Cardiomegaly" in row["findings"])
    y = np.array(labels, dtype=float)
    r = np.array(ratios)
    return {
        "pa_images_measured": len(r),
        "pa_images": len(rows),
        "positives": int(y.sum()),
        "auroc_ctr": round(evaluate.auroc(y, r), 3) if 0 < y.sum() < len(y) else None,
        "present_at_0.5": {
            "sensitivity": round(float((r[y == 1] > 0.5).mean()), 3) if y.sum() else None,
            "specificity": round(float((r[y == 0] <= 0.5).mean()), 3),
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"))
    parser.add_argument("--kermany", type=int, default=400, help="random Kermany images")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    cascade = Cascade.load()
    warn = cascade.anatomy_options.min_lung_share
    report: dict[str, Any] = {"warning_below_lung_share": warn}
    sets = {
        "kermany-train": images_of(args.data / "kermany-train", "path", args.kermany),
        "nih-sample": images_of(args.data / "nih-sample", "image", None),
        "nih-pneumonia": images_of(args.data / "nih-pneumonia", "image", 300),
        "tb-sakha": images_of(args.data / "tb-sakha", "path", None),
    }
    for name, paths in sets.items():
        report[name] = summary(run_set(cascade, paths), warn)
        print(name, json.dumps(report[name]), flush=True)
    report["non_chest_dicom"] = non_chest(cascade, args.data / "dicom")
    report["nih_sample_cardiomegaly"] = nih_cardiomegaly(cascade, args.data / "nih-sample")
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
