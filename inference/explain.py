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
from scipy import ndimage
from torch import nn

from inference.anatomy import HEART, LEFT_LUNG, RIGHT_LUNG, Anatomy
from inference.anatomy import outline as anatomy_outline

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


def render_overlay(
    display: np.ndarray,
    heat: np.ndarray | None,
    caption: str,
    anatomy: Anatomy | None = None,
    outlines: bool = True,
    ctr_lines: bool = True,
) -> np.ndarray:
    """RGB uint8 overlay (at most OVERLAY_MAX_SIDE per side) with legend and marking.

    ``display`` is the [0, 1] display image, ``heat`` a [0, 1] map over the same field
    (any grid: it is resampled to the overlay's size), or None when no heatmap was made
    (an image only measured). With an assessed ``anatomy`` the lung and heart outlines
    and the two widths of the cardiothoracic ratio are drawn, each switchable.
    """
    scale = min(1.0, OVERLAY_MAX_SIDE / max(display.shape))
    size = (max(1, round(display.shape[1] * scale)), max(1, round(display.shape[0] * scale)))
    grey = Image.fromarray((display * 255).astype(np.uint8)).resize(size, Image.Resampling.BOX)
    base = np.repeat(np.asarray(grey, dtype=np.float32)[..., None], 3, axis=2)
    if heat is not None:
        heat_small = np.asarray(
            Image.fromarray(heat.astype(np.float32)).resize(size, Image.Resampling.BILINEAR)
        )
        colour = COLORMAP[(np.clip(heat_small, 0, 1) * 255).astype(np.uint8)].astype(np.float32)
        alpha = (HEAT_ALPHA * (heat_small >= MIN_HEAT))[..., None]
        base = base * (1 - alpha) + colour * alpha
    rgb = Image.fromarray(base.astype(np.uint8))
    if anatomy is not None and anatomy.assessed:
        _draw_anatomy(rgb, anatomy, outlines, ctr_lines)
    _annotate(rgb, caption, legend=heat is not None)
    return np.asarray(rgb)


def _draw_anatomy(img: Image.Image, found: Anatomy, outlines: bool, ctr_lines: bool) -> None:
    """Outlines of the lungs (cyan) and heart (magenta); the CTR's widths and value."""
    width, height = img.size
    grid_h, grid_w = found.masks.shape[1:]
    pixels = np.asarray(img).copy()
    if outlines:
        for structure, rgb in (
            (HEART, (255, 0, 255)),
            (RIGHT_LUNG, (0, 255, 255)),
            (LEFT_LUNG, (0, 255, 255)),
        ):
            mask = Image.fromarray(found.mask(structure).astype(np.uint8) * 255)
            big = np.asarray(mask.resize((width, height), Image.Resampling.NEAREST)) > 0
            edge = anatomy_outline(big)
            pixels[ndimage.binary_dilation(edge, iterations=max(1, width // 512))] = rgb
    drawn = Image.fromarray(pixels)
    img.paste(drawn)
    if not ctr_lines or found.heart_line is None or found.thorax_line is None:
        return
    draw = ImageDraw.Draw(img)
    line_w = max(2, width // 300)
    font = ImageFont.load_default(size=max(10, height // 45))
    for line, rgb in ((found.heart_line, (255, 0, 255)), (found.thorax_line, (0, 255, 255))):
        y = (line.row + 0.5) * height / grid_h
        x0, x1 = line.col_start * width / grid_w, (line.col_end + 1) * width / grid_w
        draw.line([(x0, y), (x1, y)], fill=rgb, width=line_w)
    assert found.ctr is not None
    row = (found.heart_line.row + 0.5) * height / grid_h
    x_mid = (found.heart_line.col_start + found.heart_line.col_end + 1) / 2 * width / grid_w
    draw.text(
        (x_mid, row - line_w * 2),
        f"CTR {found.ctr:.2f}",
        font=font,
        fill=(255, 0, 255),
        anchor="mb",
        stroke_width=2,
        stroke_fill="black",
    )


def _annotate(img: Image.Image, caption: str, legend: bool = True) -> None:
    draw = ImageDraw.Draw(img)
    width, height = img.size
    font_size = max(10, height // 40)
    font = ImageFont.load_default(size=font_size)
    pad = font_size // 2
    if legend:
        _legend(draw, width, font, font_size, pad, height // 3)
    marking = f"AI-GENERATED {'HEATMAP' if legend else 'ANNOTATION'} - NOT FOR DIAGNOSIS"
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


def _legend(
    draw: ImageDraw.ImageDraw,
    width: int,
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
    font_size: int,
    pad: int,
    bar_h: int,
) -> None:
    """A vertical colour bar on the right, high at the top."""
    bar_w = max(6, width // 60)
    x0, y0 = width - bar_w - pad, pad + font_size + pad
    for i in range(bar_h):
        draw.line(
            [(x0, y0 + i), (x0 + bar_w, y0 + i)], fill=tuple(COLORMAP[255 - i * 255 // bar_h])
        )
    for text, y, anchor in (("high", y0 - pad, "rb"), ("low", y0 + bar_h + pad, "rt")):
        draw.text(
            (x0 + bar_w, y),
            text,
            font=font,
            fill="white",
            anchor=anchor,
            stroke_width=1,
            stroke_fill="black",
        )
