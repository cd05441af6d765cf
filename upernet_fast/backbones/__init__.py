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

    if not _autobackbone_knows(model_type):  # say so briefly, not with transformers' list of every model
        raise ValueError(
            f"unknown backbone type {model_type!r}: native backbones are {', '.join(sorted(BACKBONES))}; "
            "other types need one that transformers' AutoBackbone builds, and it has no backbone of this type"
        )
    return wrap_transformers_backbone(backbone_config, supported=sorted(BACKBONES))


def _autobackbone_knows(model_type: Any) -> bool:
    """True when transformers' AutoBackbone has this model type, or transformers is absent (the wrapper then
    says that transformers is needed)."""
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_BACKBONE_MAPPING_NAMES
    except ImportError:
        return True
    return model_type in MODEL_FOR_BACKBONE_MAPPING_NAMES


__all__ = ["BACKBONES", "Backbone", "BackboneOutput", "build_backbone"]
