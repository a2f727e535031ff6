"""MobileNetV3 for single-channel radiographs.

Written here because torchvision's compiled operators do not load with the CPU build of
torch we deploy on. Follows Howard et al., "Searching for MobileNetV3" (ICCV 2019), tables
1 and 2: inverted residual blocks with optional squeeze-and-excitation and hard-swish.
The `features`/`head` split mirrors torchvision so Grad-CAM can target the last
convolutional stage (``features``) by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn


def _make_divisible(value: float, divisor: int = 8) -> int:
    """Round channel counts the way the paper's reference implementation does."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


@dataclass(frozen=True)
class BlockSpec:
    kernel: int
    expanded: int
    out: int
    squeeze_excite: bool
    activation: Literal["RE", "HS"]
    stride: int


# (kernel, expanded channels, output channels, SE, activation, stride) — paper table 2.
SMALL: tuple[BlockSpec, ...] = tuple(
    BlockSpec(*row)  # type: ignore[arg-type]
    for row in [
        (3, 16, 16, True, "RE", 2),
        (3, 72, 24, False, "RE", 2),
        (3, 88, 24, False, "RE", 1),
        (5, 96, 40, True, "HS", 2),
        (5, 240, 40, True, "HS", 1),
        (5, 240, 40, True, "HS", 1),
        (5, 120, 48, True, "HS", 1),
        (5, 144, 48, True, "HS", 1),
        (5, 288, 96, True, "HS", 2),
        (5, 576, 96, True, "HS", 1),
        (5, 576, 96, True, "HS", 1),
    ]
)


class SqueezeExcite(nn.Module):
    """Channel attention: global pool → bottleneck → hard-sigmoid gate."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        squeezed = _make_divisible(channels // 4)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeezed, 1)
        self.fc2 = nn.Conv2d(squeezed, channels, 1)
        self.act = nn.ReLU(inplace=True)
        self.gate = nn.Hardsigmoid(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.gate(self.fc2(self.act(self.fc1(self.pool(x)))))
        return x * scale


def _conv_bn_act(
    cin: int, cout: int, kernel: int, stride: int, groups: int, act: type[nn.Module] | None
) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout, eps=0.001, momentum=0.01),
    ]
    if act is not None:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """Expand (1x1) → depthwise (kxk) → [SE] → project (1x1), residual when shapes match."""

    def __init__(self, cin: int, spec: BlockSpec) -> None:
        super().__init__()
        act: type[nn.Module] = nn.Hardswish if spec.activation == "HS" else nn.ReLU
        layers: list[nn.Module] = []
        if spec.expanded != cin:
            layers.append(_conv_bn_act(cin, spec.expanded, 1, 1, 1, act))
        layers.append(
            _conv_bn_act(spec.expanded, spec.expanded, spec.kernel, spec.stride, spec.expanded, act)
        )
        if spec.squeeze_excite:
            layers.append(SqueezeExcite(spec.expanded))
        layers.append(_conv_bn_act(spec.expanded, spec.out, 1, 1, 1, None))
        self.block = nn.Sequential(*layers)
        self.residual = spec.stride == 1 and cin == spec.out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.residual else out


class MobileNetV3(nn.Module):
    """MobileNetV3-Small with a configurable input channel count and width multiplier.

    ``forward`` returns logits; ``embed_and_probe`` also returns the pooled penultimate
    features (polarity probe) and the mean/std of a mid-level block (distance gate).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 1,
        width: float = 1.0,
        last_channels: int = 1024,
        dropout: float = 0.2,
        blocks: tuple[BlockSpec, ...] = SMALL,
    ) -> None:
        super().__init__()
        stem = _make_divisible(16 * width)
        layers: list[nn.Module] = [_conv_bn_act(in_channels, stem, 3, 2, 1, nn.Hardswish)]
        cin = stem
        for spec in blocks:
            scaled = BlockSpec(
                spec.kernel,
                _make_divisible(spec.expanded * width),
                _make_divisible(spec.out * width),
                spec.squeeze_excite,
                spec.activation,
                spec.stride,
            )
            layers.append(InvertedResidual(cin, scaled))
            cin = scaled.out
        final = 6 * cin
        layers.append(_conv_bn_act(cin, final, 1, 1, 1, nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(
            nn.Linear(final, last_channels),
            nn.Hardswish(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(last_channels, num_classes),
        )
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    # Blocks whose activation statistics feed the distance gate: an early one (texture,
    # exposure: catches noise, blank and non-radiographic images) and a deeper one
    # (content), both before the features collapse onto the two classes.
    probe_blocks = (3, 9)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.features(x)), 1)

    def embed_and_probe(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Pooled final features and the channel mean‖std of each probe block, one pass."""
        probes = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in self.probe_blocks:
                probes.append(torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1))
        return torch.flatten(self.pool(x), 1), probes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))
