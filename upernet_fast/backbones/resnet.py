"""Native ResNet backbone: same outputs and checkpoint keys as transformers' `ResNetBackbone` (5.x).

Reference semantics worth knowing:
- stem = conv7x7/2 (no bias) + BN + `hidden_act` + maxpool 3x3/2 pad 1; `hidden_states[0]` is after the pool;
- inside a residual layer the convs use ReLU whatever `hidden_act` says; only the stem and the activation
  after the residual sum use `hidden_act` (transformers passes `activation` to those only);
- the first layer of each stage carries the stride (stage 1: 2 only if `downsample_in_first_stage`) and a
  1x1 conv + BN shortcut whenever channels or stride change; a bottleneck has width out_channels // 4 and
  strides its 3x3 conv unless `downsample_in_bottleneck` moves the stride to the first 1x1;
- `hidden_states` = (stem output, each stage output), feature maps are picked from them un-normed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .base import Backbone, BackboneOutput

if TYPE_CHECKING:
    from ..dispatch import Plan

# transformers' ResNetConfig defaults (ResNet-50).
RESNET_DEFAULTS: dict[str, Any] = {
    "num_channels": 3,
    "embedding_size": 64,
    "hidden_sizes": [256, 512, 1024, 2048],
    "depths": [3, 4, 6, 3],
    "layer_type": "bottleneck",
    "hidden_act": "relu",
    "downsample_in_first_stage": False,
    "downsample_in_bottleneck": False,
}

_ACT = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "swish": nn.SiLU}


class ResNetConvLayer(nn.Module):
    def __init__(
        self, c_in: int, c_out: int, kernel_size: int = 3, stride: int = 1, activation: str | None = "relu"
    ) -> None:
        super().__init__()
        self.convolution = nn.Conv2d(c_in, c_out, kernel_size, stride, padding=kernel_size // 2, bias=False)
        self.normalization = nn.BatchNorm2d(c_out)
        self.activation = _ACT[activation]() if activation is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.normalization(self.convolution(x)))


class ResNetEmbeddings(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        self.embedder = ResNetConvLayer(
            cfg["num_channels"], cfg["embedding_size"], kernel_size=7, stride=2, activation=cfg["hidden_act"]
        )
        self.pooler = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pooler(self.embedder(x))


class ResNetShortCut(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.convolution = nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False)
        self.normalization = nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalization(self.convolution(x))


class ResNetLayer(nn.Module):
    """Basic (two 3x3) or bottleneck (1x1, 3x3, 1x1) residual layer."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        stride: int,
        activation: str,
        bottleneck: bool,
        downsample_in_bottleneck: bool,
    ) -> None:
        super().__init__()
        self.shortcut = ResNetShortCut(c_in, c_out, stride) if c_in != c_out or stride != 1 else nn.Identity()
        if bottleneck:
            mid = c_out // 4
            s1, s2 = (stride, 1) if downsample_in_bottleneck else (1, stride)
            self.layer = nn.Sequential(
                ResNetConvLayer(c_in, mid, kernel_size=1, stride=s1),
                ResNetConvLayer(mid, mid, stride=s2),
                ResNetConvLayer(mid, c_out, kernel_size=1, activation=None),
            )
        else:
            self.layer = nn.Sequential(
                ResNetConvLayer(c_in, c_out, stride=stride), ResNetConvLayer(c_out, c_out, activation=None)
            )
        self.activation = _ACT[activation]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.layer(x) + self.shortcut(x))


class ResNetStage(nn.Module):
    def __init__(self, cfg: dict[str, Any], c_in: int, c_out: int, stride: int, depth: int) -> None:
        super().__init__()
        bottleneck = cfg["layer_type"] == "bottleneck"
        args = (cfg["hidden_act"], bottleneck, cfg["downsample_in_bottleneck"])
        self.layers = nn.Sequential(
            ResNetLayer(c_in, c_out, stride, *args),
            *[ResNetLayer(c_out, c_out, 1, *args) for _ in range(depth - 1)],
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ResNetEncoder(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        c_ins = [cfg["embedding_size"], *cfg["hidden_sizes"][:-1]]
        strides = [2 if cfg["downsample_in_first_stage"] else 1] + [2] * (len(cfg["depths"]) - 1)
        self.stages = nn.ModuleList(
            ResNetStage(cfg, c_in, c_out, s, d)
            for c_in, c_out, s, d in zip(c_ins, cfg["hidden_sizes"], strides, cfg["depths"])
        )


class ResNetBackbone(Backbone):
    """Drop-in for transformers' `ResNetBackbone`; `config` is the raw `backbone_config` dict of an UperNet config."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        cfg = self._setup(
            config,
            RESNET_DEFAULTS,
            _ACT,
            lambda c: [c["embedding_size"], *c["hidden_sizes"]],
            lambda c: [4] + [4 * 2 ** (i + c["downsample_in_first_stage"]) for i in range(len(c["depths"]))],
            "ResNet",
        )
        if cfg["layer_type"] not in ("basic", "bottleneck"):
            raise ValueError(f"layer_type={cfg['layer_type']!r} is not one of basic, bottleneck")

        self.embedder = ResNetEmbeddings(cfg)
        self.encoder = ResNetEncoder(cfg)

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        plan: Plan | None = None,
    ) -> BackboneOutput:
        # `plan` gets no notes: every layer is PyTorch's conv/BatchNorm, there is no alternative path.
        if pixel_values.shape[1] != self.num_channels:
            raise ValueError(
                "Make sure that the channel dimension of the pixel values match with the one set in the configuration."
            )
        x = self.embedder(pixel_values)
        hidden_states = [x]
        # Stages past the deepest selected one change no output unless all hidden states are wanted.
        last = len(self.encoder.stages) if output_hidden_states else self._deepest
        for stage in self.encoder.stages[:last]:
            x = stage(x)
            hidden_states.append(x)
        feature_maps = tuple(hidden_states[self.stage_names.index(s)] for s in self.out_features)
        return BackboneOutput(
            feature_maps=feature_maps, hidden_states=tuple(hidden_states) if output_hidden_states else None
        )
