"""Network definitions, addressed by the names bundles use in ``configs/inference.json``."""

from inference.networks.mobilenet_v3 import MobileNetV3
from inference.networks.resnet import resnet18

__all__ = ["MobileNetV3", "resnet18"]
