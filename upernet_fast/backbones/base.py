"""What every native backbone provides, so the head and `load()` never look inside one."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class BackboneOutput:
    """Mirror of transformers' `BackboneOutput` (same fields, same meaning)."""

    feature_maps: tuple[torch.Tensor, ...]
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


def eager_inference() -> bool:
    """Whether the inference-only fast paths may run: no autograd graph is being recorded (they work in
    place and cache tensors) and torch.compile is not tracing (it traces the plain ops and fuses them
    itself; dynamo cannot trace the oneDNN availability checks or the caches)."""
    return not torch.is_grad_enabled() and not torch.compiler.is_compiling()


def stage_selection(config: dict[str, Any], num_stages: int) -> list[str]:
    """The `out_features` a transformers backbone config selects (`out_indices` if only that is given).

    Defaults to the last stage, as transformers does."""
    stage_names = ["stem"] + [f"stage{i}" for i in range(1, num_stages + 1)]
    out_features = config.get("out_features")
    out_indices = config.get("out_indices")
    if out_features is None and out_indices is not None:
        out_features = [stage_names[i] for i in out_indices]
    if out_features is None:
        out_features = [stage_names[-1]]
    unknown = [f for f in out_features if f not in stage_names]
    if unknown:
        raise ValueError(f"backbone out_features {unknown} are not stages of this backbone ({stage_names})")
    return list(out_features)


class Backbone(nn.Module):
    """Base class. Subclasses set:

    - `channels`: channel count of each returned feature map (transformers' `backbone.channels`);
    - `reduction`: total stride of the deepest returned feature map (inputs smaller than this are refused);
    and implement `forward(pixel_values, output_hidden_states=False, output_attentions=False, plan=None)
    -> BackboneOutput`. `plan` is the `dispatch.Plan` of this input signature (None: nothing to record,
    e.g. under torch.compile); while it is not frozen, the backbone notes each implementation choice it
    makes (`plan.note(owner module, part, implementation, why)`), from the same tests its code branches on.

    Parameter names below `backbone.` are exactly those of the checkpoint file transformers writes.
    `remap_state_dict` turns alternative key layouts (e.g. transformers 5's in-memory Swin names) into ours.
    """

    channels: list[int]
    reduction: int
    num_channels: int = 3
    optional_keys: tuple[str, ...] = ()  # may be absent from older checkpoints (kept, unused)

    def set_absent_optional_keys(self, keys: set[str]) -> None:
        """Called by the loader with the `optional_keys` the checkpoint lacks (state_dict keys mirror the file)."""

    def _setup(
        self,
        config: dict[str, Any],
        defaults: dict[str, Any],
        activations: dict[str, Any],
        num_features: Callable[[dict[str, Any]], list[int]],
        strides: Callable[[dict[str, Any]], list[int]],
        name: str,
        check: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """The setup every native backbone shares: its config (`defaults` overlaid with the keys of
        `config` it knows), the activation check, and `num_channels`, `stage_names`, `out_features` (in
        stage order, as transformers returns them), `channels` and `reduction`. `num_features(cfg)` and
        `strides(cfg)` give the channels and the total stride of the stem and of each stage; `check(cfg)`,
        run after the activation check, raises for a config they cannot read. Returns the config."""
        cfg = {**defaults, **{k: v for k, v in config.items() if k in defaults}}
        if cfg["hidden_act"] not in activations:
            raise ValueError(
                f"{name} hidden_act {cfg['hidden_act']!r} unsupported; use one of {list(activations)}"
            )
        if check is not None:
            check(cfg)
        num_stages = len(cfg["depths"])
        self.config = cfg
        self.num_channels = cfg["num_channels"]
        self.stage_names = ["stem"] + [f"stage{i}" for i in range(1, num_stages + 1)]
        selected = set(stage_selection(config, num_stages))
        self.out_features = [s for s in self.stage_names if s in selected]
        features = num_features(cfg)
        self.channels = [features[self.stage_names.index(s)] for s in self.out_features]
        self._deepest = self.stage_names.index(self.out_features[-1])
        self.reduction = strides(cfg)[self._deepest]
        return cfg

    @staticmethod
    def remap_state_dict(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
        return state_dict
