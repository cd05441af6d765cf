"""Any other backbone type: transformers' AutoBackbone, used as-is (needs transformers).

The transformers module itself becomes `model.backbone`, so its state_dict keys are the checkpoint's.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import BackboneOutput


def wrap_transformers_backbone(backbone_config: dict[str, Any], supported: list[str]) -> torch.nn.Module:
    model_type = backbone_config.get("model_type")
    try:
        from transformers import AutoBackbone, AutoConfig
    except ImportError:
        raise ValueError(
            f"backbone type {model_type!r} has no native implementation (native: {', '.join(supported)}) "
            "and transformers is not installed to provide it; `pip install transformers` or use a "
            "supported backbone"
        ) from None
    try:
        cfg = AutoConfig.for_model(**backbone_config)
        hf = AutoBackbone.from_config(cfg)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"unknown backbone type {model_type!r}: not native (native: {', '.join(supported)}) and "
            f"transformers cannot build it ({e})"
        ) from None
    hf.reduction = int(getattr(cfg, "encoder_stride", 0) or 32)
    hf.num_channels = int(getattr(cfg, "num_channels", 3))
    hf.remap_state_dict = lambda state_dict, prefix: state_dict
    hf.is_transformers_backbone = True
    return hf


def run_transformers_backbone(
    hf: torch.nn.Module, pixel_values: torch.Tensor, output_hidden_states: bool, output_attentions: bool
) -> BackboneOutput:
    out = hf.forward_with_filtered_kwargs(
        pixel_values, output_hidden_states=output_hidden_states, output_attentions=output_attentions
    )
    return BackboneOutput(out.feature_maps, out.hidden_states, getattr(out, "attentions", None))
