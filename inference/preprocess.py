"""The one MONAI transform chain from a display-ready image to a network input.

Training (JPEG radiographs) and serving (decoded DICOM) both enter here with a float32
H×W image in [0, 1] (see :mod:`inference.decode`), so intensity handling is identical in
both: what the model saw in training is what it sees in the hospital. Augmentation is
inserted between the spatial and the intensity steps, for training only.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    NormalizeIntensityd,
    RandAdjustContrastd,
    RandAffined,
    RandGaussianNoised,
    RandGaussianSmoothd,
    Resized,
    ScaleIntensityRangePercentilesd,
)
from monai.transforms.transform import MapTransform

KEY = "image"
INPUT_SIZE = 224  # the training images are 224×224; the networks are fully convolutional


def spatial_steps(size: int = INPUT_SIZE) -> list[MapTransform]:
    """Channel-first, then an anti-aliased resize of the whole field to the network grid.

    The training set was resized without keeping the aspect ratio, so serving does the
    same rather than padding: the lungs then occupy the same fraction of the input.
    """
    return [
        EnsureChannelFirstd(KEY, channel_dim="no_channel"),
        Resized(KEY, spatial_size=(size, size), mode="area"),
    ]


def intensity_steps() -> list[MapTransform]:
    """Robust contrast stretch then per-image standardisation (scanner-independent)."""
    return [
        ScaleIntensityRangePercentilesd(KEY, lower=1, upper=99, b_min=0.0, b_max=1.0, clip=True),
        NormalizeIntensityd(KEY),
        EnsureTyped(KEY, dtype=torch.float32, track_meta=False),
    ]


def augmentation_steps() -> list[MapTransform]:
    """Mild, anatomy-preserving variation: positioning, exposure, detector noise."""
    return [
        RandAffined(
            KEY,
            prob=0.8,
            rotate_range=np.deg2rad(10),
            scale_range=(0.12, 0.12),
            translate_range=(12, 12),
            padding_mode="border",
        ),
        RandAdjustContrastd(KEY, prob=0.5, gamma=(0.7, 1.5)),
        RandGaussianSmoothd(KEY, prob=0.2, sigma_x=(0.3, 1.0), sigma_y=(0.3, 1.0)),
        RandGaussianNoised(KEY, prob=0.3, std=0.02),
    ]


def inference_transforms(size: int = INPUT_SIZE) -> Compose:
    return Compose([*spatial_steps(size), *intensity_steps()])


def training_transforms(size: int = INPUT_SIZE) -> Compose:
    return Compose([*spatial_steps(size), *augmentation_steps(), *intensity_steps()])


def to_network_input(display: np.ndarray, transforms: Compose | None = None) -> torch.Tensor:
    """Apply the chain to one display image; returns a 1×H×W float tensor."""
    chain = transforms if transforms is not None else inference_transforms()
    out = chain({KEY: display.astype(np.float32, copy=False)})
    return torch.as_tensor(out[KEY])
