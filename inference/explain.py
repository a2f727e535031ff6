"""Where the model looked: Grad-CAM maps and the overlay a radiologist sees.

Grad-CAM (Selvaraju et al., ICCV 2017) comes from ``monai.visualize``; this module picks
the target layer per network, brings the map back onto the original image grid, and
renders the overlay that is sent to PACS as a secondary capture: the radiograph, a
colour-mapped heatmap, a colour legend and a burned-in "AI-generated" marking so the image
can never be mistaken for an acquisition.
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.visualize import GradCAM
from PIL import Image, ImageDraw, ImageFont
from torch import nn

OVERLAY_MAX_SIDE = 1024  # secondary captures are for viewing, not measurement
HEAT_ALPHA = 0.45
MIN_HEAT = 0.2  # below this the heatmap stays transparent, so anatomy remains readable


class _FromTargetLayer(nn.Module):
    """The network split at its last convolutional stage, for a cheap Grad-CAM.

    Grad-CAM needs the gradient of the class score with respect to the target layer's
    activations only. Running the trunk without autograd and the tail (pooling and
    classifier) with it gives MONAI's GradCAM exactly the same activations and
    gradients, for a backward pass through a few layers instead of the whole network.
    """

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network
        self.target = nn.Identity()  # MONAI hooks this module: it sees the activations

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            activations = self._trunk(x)
        return self._tail(self.target(activations.requires_grad_()))

    def _trunk(self, x: torch.Tensor) -> torch.Tensor:
        net: Any = self.network
        if hasattr(net, "features"):  # MobileNetV3
            return net.features(x)
        x = net.act(net.bn1(net.conv1(x)))  # MONAI ResNet, as in ResNet.forward
        if not net.no_max_pool:
            x = net.maxpool(x)
        return net.layer4(net.layer3(net.layer2(net.layer1(x))))

    def _tail(self, activations: torch.Tensor) -> torch.Tensor:
        net: Any = self.network
        if hasattr(net, "features"):
            return net.head(torch.flatten(net.pool(activations), 1))
        return net.fc(torch.flatten(net.avgpool(activations), 1))


_CAMS: weakref.WeakKeyDictionary[nn.Module, GradCAM] = weakref.WeakKeyDictionary()


def _cam_for(network: nn.Module) -> GradCAM:
    """One GradCAM per network: MONAI registers its hooks at construction and never
    removes them, so a new object per call would pile hooks onto the model."""
    if network not in _CAMS:
        # eval(): GradCAM restores the wrapper's mode after each call, and a wrapper left
        # in training mode would switch the shared network's batch norm to batch statistics.
        wrapper = _FromTargetLayer(network).eval()
        _CAMS[network] = GradCAM(nn_module=wrapper, target_layers="target")
    return _CAMS[network]


def grad_cam(network: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Grad-CAM for a batch (N×1×H×W) → N×H×W maps in [0, 1] on the input grid."""
    cam = _cam_for(network)
    with torch.enable_grad():
        maps = cam(inputs.detach(), class_idx=0)
    maps = torch.nan_to_num(maps.detach(), nan=0.0).squeeze(1)
    return maps.clamp(0.0, 1.0)


def to_original_grid(cam_map: torch.Tensor, shape: tuple[int, int]) -> np.ndarray:
    """Resample a map from the network grid back onto the image's own rows × columns."""
    resized = F.interpolate(
        cam_map[None, None].float(), size=shape, mode="bilinear", align_corners=False
    )
    return resized[0, 0].numpy()


def _colormap() -> np.ndarray:
    """A 256-entry 'jet'-like lookup table (blue → cyan → yellow → red), uint8 RGB."""
    x = np.linspace(0.0, 1.0, 256)
    r = np.clip(1.5 - np.abs(4 * x - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * x - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * x - 1), 0, 1)
    return (np.stack([r, g, b], axis=1) * 255).astype(np.uint8)


COLORMAP = _colormap()


def render_overlay(display: np.ndarray, heat: np.ndarray, caption: str) -> np.ndarray:
    """RGB uint8 overlay (at most OVERLAY_MAX_SIDE per side) with legend and marking.

    ``display`` is the [0, 1] display image, ``heat`` a [0, 1] map over the same field
    (any grid: it is resampled to the overlay's size).
    """
    scale = min(1.0, OVERLAY_MAX_SIDE / max(display.shape))
    size = (max(1, round(display.shape[1] * scale)), max(1, round(display.shape[0] * scale)))
    grey = Image.fromarray((display * 255).astype(np.uint8)).resize(size, Image.Resampling.BOX)
    heat_small = np.asarray(
        Image.fromarray(heat.astype(np.float32)).resize(size, Image.Resampling.BILINEAR)
    )
    base = np.repeat(np.asarray(grey, dtype=np.float32)[..., None], 3, axis=2)
    colour = COLORMAP[(np.clip(heat_small, 0, 1) * 255).astype(np.uint8)].astype(np.float32)
    alpha = (HEAT_ALPHA * (heat_small >= MIN_HEAT))[..., None]
    rgb = Image.fromarray((base * (1 - alpha) + colour * alpha).astype(np.uint8))
    _annotate(rgb, caption)
    return np.asarray(rgb)


def _annotate(img: Image.Image, caption: str) -> None:
    draw = ImageDraw.Draw(img)
    width, height = img.size
    font_size = max(10, height // 40)
    font = ImageFont.load_default(size=font_size)
    pad = font_size // 2
    # Legend: a vertical colour bar on the right, high at the top.
    bar_w, bar_h = max(6, width // 60), height // 3
    x0, y0 = width - bar_w - pad, pad + font_size + pad
    for i in range(bar_h):
        draw.line(
            [(x0, y0 + i), (x0 + bar_w, y0 + i)], fill=tuple(COLORMAP[255 - i * 255 // bar_h])
        )
    draw.text(
        (x0 + bar_w, y0 - pad),
        "high",
        font=font,
        fill="white",
        anchor="rb",
        stroke_width=1,
        stroke_fill="black",
    )
    draw.text(
        (x0 + bar_w, y0 + bar_h + pad),
        "low",
        font=font,
        fill="white",
        anchor="rt",
        stroke_width=1,
        stroke_fill="black",
    )
    marking = "AI-GENERATED HEATMAP - NOT FOR DIAGNOSIS"
    draw.text(
        (pad, pad), marking, font=font, fill=(255, 255, 0), stroke_width=2, stroke_fill="black"
    )
    draw.text(
        (pad, height - pad),
        caption,
        font=font,
        fill="white",
        anchor="ld",
        stroke_width=2,
        stroke_fill="black",
    )
