"""The segmentation stage: heart and lung masks for a batch of decoded radiographs.

The ``segment`` bundle (:mod:`inference.train_segment`) runs on the same display image
the classifiers see, through the same transform chain at its own working size, as one
batched forward pass. Masks are post-processed and measured by :mod:`inference.anatomy`.
The bundle's intended population (adults) decides whether the measurements are
reported; the masks are computed for every scored image, because the lung check of the
input gate and the Grad-CAM plausibility check need them whatever the patient's age.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from inference import anatomy
from inference.bundle import Bundle, load_bundle
from inference.manifest import SEGMENT_BUNDLE
from inference.population import ImageFacts, Population
from inference.preprocess import inference_transforms, to_network_input


@dataclass(frozen=True)
class SegmentInput:
    """One image to segment: display pixels in [0, 1], its source grid and spacing."""

    pixels: np.ndarray
    facts: ImageFacts
    spacing_mm: tuple[float, float] | None = None
    spacing_source: str | None = None


class Segmenter:
    """The ``segment`` bundle, its transform chain and its population."""

    def __init__(self, bundle: Bundle, device: torch.device | str = "cpu") -> None:
        if bundle.role != "segment":
            raise ValueError(f"{bundle.name}: a {bundle.role} bundle is not a segmentation")
        self.bundle = bundle
        self.device = torch.device(device)
        bundle.network.to(self.device)
        self.population = Population.from_metadata(bundle.metadata.get("population"))
        self.transforms = inference_transforms(bundle.input_size)

    @classmethod
    def load(cls, path: Path | None = None, device: str = "cpu") -> Segmenter:
        return cls(load_bundle(path or SEGMENT_BUNDLE), device)

    def masks(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Post-processed boolean masks (3 × S × S) for display images, one batch."""
        if not images:
            return []
        batch = torch.stack([to_network_input(p, self.transforms) for p in images])
        with torch.inference_mode():
            probs = torch.sigmoid(self.bundle.network(batch.to(self.device))).cpu().numpy()
        return [anatomy.postprocess(p) for p in probs]

    def analyze(self, inputs: Sequence[SegmentInput]) -> list[anatomy.Anatomy]:
        """Masks and, inside the population, measurements (else *not assessed*, why)."""
        results = []
        for item, masks in zip(inputs, self.masks([i.pixels for i in inputs]), strict=True):
            shape = (int(item.pixels.shape[0]), int(item.pixels.shape[1]))
            outside = self.population.reason_outside(item.facts)
            if outside is None:
                measured = anatomy.measure(masks, shape, item.spacing_mm, item.spacing_source)
            else:
                measured = anatomy.Anatomy(masks, "not_assessed", f"anatomy: {outside}")
            measured.model_name, measured.model_version = self.bundle.name, self.bundle.version
            measured.source_shape = shape
            results.append(measured)
        return results
