"""Native backbones, chosen by the `model_type` of the UperNet config's `backbone_config`."""

from __future__ import annotations

from typing import Any

from torch import nn

from .base import Backbone, BackboneOutput
from .convnext import ConvNextBackbone
from .resnet import ResNetBackbone
from .swin import SwinBackbone

BACKBONES: dict[str, type[Backbone]] = {
    "convnext": ConvNextBackbone,
    "swin": SwinBackbone,
    "resnet": ResNetBackbone,
}


def build_backbone(backbone_config: dict[str, Any]) -> nn.Module:
    """A native backbone for the config's `model_type`, else transformers' AutoBackbone when installed."""
    model_type = backbone_config.get("model_type")
    if model_type in BACKBONES:
        return BACKBONES[model_type](backbone_config)
    from .hf_wrapper import wrap_transformers_backbone

    return wrap_transformers_backbone(backbone_config, supported=sorted(BACKBONES))


__all__ = ["BACKBONES", "Backbone", "BackboneOutput", "build_backbone"]
