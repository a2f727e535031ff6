"""Anatomy benchmark: what segmentation and measurements add to one radiograph.

    python bench/bench_anatomy.py [--threads 2] [--repeats 15]

The 2500×2048 DX of :mod:`bench.bench_inference`. Reports medians in milliseconds of:
the segment network alone at its working size (the bundle's CPU target: ≤ 80 ms on 2
threads), segmentation plus measurements from the decoded image (resize, forward,
post-processing, measurements: the issue's ≤ 100 ms), the SEG object build, and the
whole ``Cascade.analyze`` with and without anatomy.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_inference import large_dx, median_ms  # noqa: E402
from dicom_node.results.common import Equipment  # noqa: E402
from dicom_node.results.registry import BuildInputs, get_output_type  # noqa: E402
from inference.cascade import Cascade  # noqa: E402
from inference.decode import decode  # noqa: E402
from inference.population import ImageFacts  # noqa: E402
from inference.segment import Segmenter, SegmentInput  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    ds = large_dx()
    ds.PatientAge, ds.ViewPosition = "060Y", "PA"  # an adult PA: everything is measured
    image = decode(ds)
    segmenter = Segmenter.load()
    size = segmenter.bundle.input_size
    item = SegmentInput(image.pixels, ImageFacts.of(ds), image.spacing_mm, image.spacing_source)
    net_input = torch.randn(1, 1, size, size)

    def forward() -> None:
        with torch.inference_mode():
            segmenter.bundle.network(net_input)

    found = segmenter.analyze([item])[0]
    figures = {
        "threads": args.threads,
        "image": f"{ds.Rows}x{ds.Columns}",
        "working_size": size,
        "segment_network_ms": median_ms(forward, args.repeats),
        "segment_and_measure_ms": median_ms(lambda: segmenter.analyze([item]), args.repeats),
        "anatomy_assessed": found.assessed,
        "ctr": found.ctr,
    }
    with_anatomy = Cascade.load()
    without = Cascade.load(findings=("pneumonia",), anatomy=False)
    figures["analyze_with_anatomy_ms"] = median_ms(lambda: with_anatomy.analyze([ds]), 5, 1)
    figures["analyze_without_anatomy_ms"] = median_ms(lambda: without.analyze([ds]), 5, 1)
    result = with_anatomy.analyze([ds])[0]
    if result.masks is not None:
        inputs = BuildInputs(ds, result, Equipment(), datetime.datetime.now(), None)
        seg = get_output_type("seg")
        figures["seg_build_ms"] = median_ms(lambda: seg.build(inputs), 5, 1)
    print(json.dumps(figures, indent=2))
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
