"""Inference engine benchmark: preprocessing, forward, Grad-CAM, whole analyze.

    python bench/bench_inference.py [--threads 2] [--repeats 15] [--device cpu|cuda]

Uses a 2500×2048 16-bit DX built from pydicom-data's RG1 chest (upsampled), the size of
a typical flat-panel chest radiograph. Prints medians in milliseconds and writes them as
JSON (``--out``). With ``--device cuda`` it also measures images/s at batch 32.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian

from inference import explain
from inference.cascade import Cascade
from inference.decode import decode
from inference.preprocess import to_network_input

ROWS, COLS = 2500, 2048


def large_dx() -> pydicom.Dataset:
    """RG1 (1955×1841, 15-bit CR chest) resampled to 2500×2048, stored as 16-bit DX."""
    ds = pydicom.dcmread(str(get_testdata_file("RG1_UNCR.dcm")))
    pixels = torch.as_tensor(ds.pixel_array.astype(np.float32))[None, None]
    big = F.interpolate(pixels, size=(ROWS, COLS), mode="bilinear")[0, 0].numpy()
    ds.Rows, ds.Columns = ROWS, COLS
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.Modality = "DX"
    ds.PatientAge = "004Y"  # inside the pneumonia model's population: every stage runs
    ds.PixelData = big.astype(np.uint16).tobytes()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def run(
    threads: int = 2, repeats: int = 15, device: str = "cpu", batch: int = 32
) -> dict[str, Any]:
    """Medians of each stage on one large DX; on CUDA also images/s of ``analyze`` on a
    batch of ``batch`` images (``bench/run_all.py`` calls it)."""
    torch.set_num_threads(threads)
    ds = large_dx()
    cascade = Cascade.load(device=device)
    screen = cascade.screen.network
    x = to_network_input(decode(ds).pixels)[None].to(device)

    def forward() -> None:
        with torch.inference_mode():
            screen(x)
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    results: dict[str, Any] = {
        "device": device,
        "threads": threads,
        "image": f"{COLS}x{ROWS} 16-bit",
        "preprocess_ms": median_ms(lambda: to_network_input(decode(ds).pixels), repeats),
        "mobilenet_forward_ms": median_ms(forward, repeats * 2),
        "mobilenet_gradcam_ms": median_ms(lambda: explain.grad_cam(screen, x), repeats),
        "analyze_ms": median_ms(lambda: cascade.analyze([ds]), repeats),
    }
    results["gradcam_over_forward"] = (
        results["mobilenet_gradcam_ms"] / results["mobilenet_forward_ms"]
    )
    if device.startswith("cuda"):
        images = [ds] * batch
        ms = median_ms(lambda: cascade.analyze(images), 5)
        results[f"batch{batch}_images_per_s"] = batch / (ms / 1000)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("bench/results/inference.json"))
    args = parser.parse_args()
    results = run(args.threads, args.repeats, args.device)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    for key, value in results.items():
        print(f"{key:>24}: {value:.1f}" if isinstance(value, float) else f"{key:>24}: {value}")


if __name__ == "__main__":
    main()
