"""ConvNeXt backbone, numerically the transformers `ConvNextBackbone`, built for inference speed.

Fast path (exact up to float rounding): activations stay channels-last in memory, so the block's
NCHW→NHWC permutes are free views; the LayerNorm affine is folded into `pwconv1` and the layer scale into
`pwconv2` (float64 fold), leaving a bare normalisation. On CPU float32 the MLP runs as two oneDNN 1x1
convolutions on the channels-last map, GELU and the residual add fused as post-ops
(`mkldnn._convolution_pointwise`): the fastest of the three variants measured
(bench/results/decisions.md, "ConvNeXt MLP"; `fused_linear.mlp_rows_` stays the path for other activations).
On a CPU with AMX-BF16 the float32 MLP of a stage may instead run as split-bfloat16 GEMMs with a float32
result (`kernels/gemm_bf16x3.py`, decided per stage by `dispatch.mlp_bf16x3_choice`), and a stage's
downsampling (LayerNorm, then a 2x2 stride-2 conv: a Linear over 2x2 patches) as one such GEMM on the
patches, the LayerNorm's affine folded in (`dispatch.linear_bf16x3_choice`).
Parameter names are transformers'.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from ..dispatch import linear_bf16x3_choice, mlp_bf16x3_decided, note_mlp_bf16x3
from ..folding import cached, precise
from ..kernels._common import CONV_POINTWISE as _CONV_POINTWISE
from ..kernels._common import onednn_prepacked
from ..kernels.gemm_bf16x3 import conv1x1_bf16x3, mlp_bf16x3_, pack_weight
from .base import Backbone, BackboneOutput, eager_inference
from .fused_linear import FUSED_ACT, LinearWeights, linear_plan, mlp_rows_, normalize, onednn_blocker

if TYPE_CHECKING:
    from ..dispatch import Plan


# transformers' ConvNextConfig defaults (hub configs may omit any of these).
CONVNEXT_DEFAULTS: dict[str, Any] = {
    "num_channels": 3,
    "patch_size": 4,
    "num_stages": 4,
    "hidden_sizes": [96, 192, 384, 768],
    "depths": [3, 3, 9, 3],
    "hidden_act": "gelu",
    "layer_scale_init_value": 1e-6,
}
LN_EPS = 1e-6  # hard-coded in transformers' ConvNeXt (stem, downsampling, blocks, stage-output norms)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {  # module-level functions, not lambdas: a model holding one still pickles
    "gelu": F.gelu,
    "gelu_new": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


class LayerNorm2d(nn.LayerNorm):
    """Channels-first LayerNorm over C of an NCHW tensor (a free permute when memory is channels-last)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)


class ConvNextEmbeddings(nn.Module):
    def __init__(self, num_channels: int, dim: int, patch_size: int) -> None:
        super().__init__()
        self.patch_embeddings = nn.Conv2d(num_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.layernorm = LayerNorm2d(dim, eps=LN_EPS)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.layernorm(self.patch_embeddings(pixel_values))


class ConvNextLayer(nn.Module):
    def __init__(self, dim: int, act: str, layer_scale_init_value: float) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.layernorm = nn.LayerNorm(dim, eps=LN_EPS)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.layer_scale_parameter = (
            nn.Parameter(layer_scale_init_value * torch.ones(dim)) if layer_scale_init_value > 0 else None
        )
        self.act = ACTIVATIONS[act]
        self.fused_act = FUSED_ACT.get(act)

    def folded(self) -> tuple[LinearWeights, LinearWeights]:
        ln, fc1, fc2, gamma = self.layernorm, self.pwconv1, self.pwconv2, self.layer_scale_parameter

        def build() -> tuple[LinearWeights, LinearWeights]:
            dtype = fc1.weight.dtype
            ln_w, ln_b, w1, b1, w2, b2 = (
                precise(t).double() for t in (ln.weight, ln.bias, fc1.weight, fc1.bias, fc2.weight, fc2.bias)
            )
            b1 = b1 + w1 @ ln_b
            w1 = w1 * ln_w  # LN scale → columns of fc1
            if gamma is not None:  # layer scale → rows of fc2
                scale = precise(gamma).double()
                w2, b2 = w2 * scale[:, None], b2 * scale
            w1, b1, w2, b2 = (t.to(dtype).contiguous() for t in (w1, b1, w2, b2))
            return LinearWeights(w1, b1), LinearWeights(w2, b2)

        return cached(self, "mlp", self._mlp_sources(), build)

    def _mlp_sources(self) -> list[torch.Tensor | None]:
        """The parameters the folded MLP weights come from (the cache keys of `folded` and `packed_bf16x3`:
        the module's own tensors, which track versions also when the folds were built in inference mode)."""
        ln, fc1, fc2 = self.layernorm, self.pwconv1, self.pwconv2
        return [ln.weight, ln.bias, fc1.weight, fc1.bias, fc2.weight, fc2.bias, self.layer_scale_parameter]

    def packed_bf16x3(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The folded MLP weights as ``mlp_bf16x3_`` takes them (built once)."""
        fc1, fc2 = self.folded()
        build = lambda: (pack_weight(fc1.weight), pack_weight(fc2.weight))  # noqa: E731
        return cached(self, "mlp_bf16x3", self._mlp_sources(), build)

    def forward(self, x: torch.Tensor, bf16x3: bool = False) -> torch.Tensor:
        """``bf16x3``: run the MLP as split-bfloat16 GEMMs (``dispatch.mlp_bf16x3_choice`` decided it)."""
        fc1, fc2 = self.folded()
        if not eager_inference():  # the in-place fast paths below are for eager inference only
            y = self.dwconv(x).permute(0, 2, 3, 1)
            y = F.layer_norm(y, self.layernorm.normalized_shape, None, None, self.layernorm.eps)
            y = F.linear(self.act(F.linear(y, fc1.weight, fc1.bias)), fc2.weight, fc2.bias)
            return x + y.permute(0, 3, 1, 2)
        x = x.contiguous(memory_format=torch.channels_last)
        if bf16x3:
            y = self.dwconv(x).contiguous(memory_format=torch.channels_last)  # a no-op: oneDNN keeps it
            w1, w2 = self.packed_bf16x3()
            return mlp_bf16x3_(y, x, w1, fc1.bias, w2, fc2.bias, self.layernorm.eps)
        if self.onednn_mlp_blocker(x) is None:
            return self._forward_onednn(x, fc1, fc2)
        y = self.dwconv(x).contiguous(memory_format=torch.channels_last)  # no-ops on the fast path
        c = y.shape[1]
        rows, residual = y.permute(0, 2, 3, 1).view(-1, c), x.permute(0, 2, 3, 1).view(-1, c)
        mlp_rows_(rows, rows, fc1, fc2, self.layernorm.eps, self.fused_act, self.act, residual=residual)
        return y

    def onednn_mlp_blocker(self, x: torch.Tensor) -> str | None:
        """Why the MLP cannot run as oneDNN 1x1 convs (`_forward_onednn`) on `x`, or None when it does: the
        test `forward` branches on, and what the plan notes."""
        if self.fused_act is None:
            return "no oneDNN post-op for this hidden_act"
        if _CONV_POINTWISE is None:
            return "this PyTorch build has no mkldnn._convolution_pointwise"
        return onednn_blocker(x, bf16=True)

    def _forward_onednn(self, x: torch.Tensor, fc1: LinearWeights, fc2: LinearWeights) -> torch.Tensor:
        """x + pwconv2(act(pwconv1(norm(dwconv(x))))) as 1x1 oneDNN convs with fused post-ops (x channels-last).
        Also taken in bfloat16 on a native-bf16 CPU: 5% faster end to end there, same logits
        (bench/results/decisions.md, "ConvNeXt MLP"); Swin's bf16 Linears stay on MKL (no gain, and a
        lower argmax agreement through oneDNN)."""
        y = self.dwconv(x)
        w1, w2 = self.prepacked_onednn(x)
        return mlp_onednn(y, x, w1, fc1.bias, w2, fc2.bias, self.layernorm.eps, self.fused_act)

    def prepacked_onednn(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The folded MLP weights as `_forward_onednn`'s 1x1 conv weights, prepacked for inputs like `x`
        (built once per dtype)."""
        fc1, fc2 = self.folded()
        hidden = (x.shape[0], fc1.weight.shape[0], *x.shape[2:])
        build = lambda: (  # noqa: E731
            onednn_prepacked(fc1.weight[:, :, None, None], x.shape),
            onednn_prepacked(fc2.weight[:, :, None, None], hidden),
        )
        return cached(self, f"mlp_onednn_{fc1.weight.dtype}", self._mlp_sources(), build)


def mlp_onednn(
    y: torch.Tensor,
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    eps: float,
    fused_act: tuple[str, str],
) -> torch.Tensor:
    """x + linear2(act(linear1(norm(y)))) over channels-last maps as two oneDNN 1x1 convs, the activation
    (``FUSED_ACT`` entry) and the residual add as post-ops; affine-free LayerNorm (folded weights). ``w1``,
    ``w2``: 1x1 conv weights, dense or from ``onednn_prepacked``."""
    y = normalize(y.permute(0, 2, 3, 1), eps).permute(0, 3, 1, 2)
    attr, algo = fused_act
    one, zero = [1, 1], [0, 0]
    hidden = _CONV_POINTWISE(y, w1, b1, zero, one, one, 1, attr, [], algo)
    return _CONV_POINTWISE.binary(hidden, x, w2, b2, zero, one, one, 1, "add", None, None, [], None)


class ConvNextStage(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, stride: int, depth: int, act: str, ls: float) -> None:
        super().__init__()
        if in_dim != out_dim or stride > 1:
            self.downsampling_layer = nn.ModuleList(
                [
                    LayerNorm2d(in_dim, eps=LN_EPS),
                    nn.Conv2d(in_dim, out_dim, kernel_size=stride, stride=stride),
                ]
            )
        else:
            self.downsampling_layer = nn.ModuleList()
        self.layers = nn.ModuleList([ConvNextLayer(out_dim, act, ls) for _ in range(depth)])

    def downsample(self, x: torch.Tensor, bf16x3: bool = False) -> torch.Tensor:
        """LayerNorm + patchify conv (none for the first stage); ``bf16x3``: as one split-bfloat16 GEMM on
        the normalised s x s patches (eager CPU float32 inference on AMX; `ConvNextBackbone` decides)."""
        if bf16x3:
            return self._downsample_bf16x3(x)
        for layer in self.downsampling_layer:
            x = layer(x)
        return x

    def downsample_features(self) -> tuple[int, int, int] | None:
        """(stride, in features, out features) of the downsampling conv as a Linear over its s x s patches,
        or None without one (or a conv that is not a patchify conv)."""
        if not self.downsampling_layer:
            return None
        conv = self.downsampling_layer[1]
        s = conv.stride[0]
        if conv.kernel_size != (s, s) or conv.stride != (s, s) or conv.padding != (0, 0) or conv.groups != 1:
            return None
        return s, s * s * conv.in_channels, conv.out_channels

    def _downsample_packed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The conv as ``conv1x1_bf16x3`` weights over (row, column, channel)-ordered patches, the LayerNorm's
        affine folded in (float64): W'[n, i, j, c] = W[n, c, i, j] γ[c], b' = b + Σ W[n, c, i, j] β[c]."""
        norm, conv = self.downsampling_layer

        def build() -> tuple[torch.Tensor, torch.Tensor]:
            w = conv.weight.detach().double().permute(0, 2, 3, 1)  # (N, s, s, C)
            b = (
                torch.zeros(w.shape[0], dtype=torch.float64)
                if conv.bias is None
                else conv.bias.detach().double()
            )
            b = b + (w * norm.bias.detach().double()).sum((1, 2, 3))
            w = (w * norm.weight.detach().double()).reshape(w.shape[0], -1)
            return pack_weight(w.float()), b.float().contiguous()

        return cached(self, "downsample_bf16x3", [norm.weight, norm.bias, conv.weight, conv.bias], build)

    def _downsample_bf16x3(self, x: torch.Tensor) -> torch.Tensor:
        norm = self.downsampling_layer[0]
        s = self.downsample_features()[0]
        b, c, h, w = x.shape
        h2, w2 = h // s, w // s  # a stride-s conv without padding drops the last h % s rows, w % s columns
        y = normalize(x.permute(0, 2, 3, 1)[:, : s * h2, : s * w2], norm.eps)  # affine-free (folded)
        patches = y.reshape(b, h2, s, w2, s, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h2, w2, s * s * c)
        packed, bias = self._downsample_packed()
        return conv1x1_bf16x3(patches.permute(0, 3, 1, 2), packed, bias, False)

    def forward(self, x: torch.Tensor, bf16x3: bool = False) -> torch.Tensor:
        x = self.downsample(x)
        for layer in self.layers:
            x = layer(x, bf16x3)
        return x


class ConvNextEncoder(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        sizes, depths = cfg["hidden_sizes"], cfg["depths"]
        act, ls = cfg["hidden_act"], cfg["layer_scale_init_value"]
        self.stages = nn.ModuleList(
            ConvNextStage(sizes[max(i - 1, 0)], sizes[i], 2 if i > 0 else 1, depths[i], act, ls)
            for i in range(cfg["num_stages"])
        )


def _check_stages(cfg: dict[str, Any]) -> None:
    if len(cfg["hidden_sizes"]) != cfg["num_stages"] or len(cfg["depths"]) != cfg["num_stages"]:
        raise ValueError("ConvNeXt config: hidden_sizes and depths must both have num_stages entries")


class ConvNextBackbone(Backbone):
    """Drop-in for transformers' `ConvNextBackbone`; `config` is the raw `backbone_config` dict of an UperNet config."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        cfg = self._setup(
            {k: v for k, v in config.items() if v is not None},  # None: transformers' default
            CONVNEXT_DEFAULTS,
            ACTIVATIONS,
            lambda c: [c["hidden_sizes"][0], *c["hidden_sizes"]],
            lambda c: [c["patch_size"] * 2 ** max(i - 1, 0) for i in range(c["num_stages"] + 1)],
            "ConvNeXt",
            check=_check_stages,
        )
        self.embeddings = ConvNextEmbeddings(cfg["num_channels"], cfg["hidden_sizes"][0], cfg["patch_size"])
        self.encoder = ConvNextEncoder(cfg)
        self.hidden_states_norms = nn.ModuleDict(
            {s: LayerNorm2d(c, eps=LN_EPS) for s, c in zip(self.out_features, self.channels, strict=True)}
        )

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        plan: Plan | None = None,
    ) -> BackboneOutput:
        x = self.embeddings(pixel_values.contiguous(memory_format=torch.channels_last))
        hidden_states = [x]
        eager = eager_inference()
        noting = plan is not None and not plan.frozen and eager
        for stage in self.encoder.stages:
            down = self._downsample_choice(plan, stage, x) if eager else (False, "")
            if noting and stage.downsampling_layer:
                self._note_downsample(plan, stage, x, down)
            x = stage.downsample(x, down[0])
            bf16x3, why_bf16x3 = self._mlp_bf16x3(plan, stage, x) if eager else (False, "")
            if noting:
                self._note_mlp(plan, stage, x, bf16x3, why_bf16x3)
            for layer in stage.layers:
                x = layer(x, bf16x3)
            hidden_states.append(x)
        feature_maps = tuple(
            self.hidden_states_norms[name](h)
            for name, h in zip(self.stage_names, hidden_states, strict=True)
            if name in self.out_features
        )
        return BackboneOutput(
            feature_maps=feature_maps, hidden_states=tuple(hidden_states) if output_hidden_states else None
        )

    def _downsample_choice(
        self, plan: Plan | None, stage: ConvNextStage, x: torch.Tensor
    ) -> tuple[bool, str]:
        """(bf16x3?, why) for `stage`'s downsampling of inputs like `x` (B, C, H, W), once per plan: as the
        Linear over s x s patches it is (`dispatch.linear_bf16x3_choice`)."""
        features = stage.downsample_features()
        if features is None:
            return False, "" if not stage.downsampling_layer else "not a patchify conv"
        s, c_in, c_out = features
        b, _, h, w = x.shape
        choose = lambda: linear_bf16x3_choice(plan, x, (c_in, c_out), (b, h // s, w // s))  # noqa: E731
        return choose() if plan is None else plan.decide(stage, "downsample-bf16x3", choose)

    def _note_downsample(
        self, plan: Plan, stage: ConvNextStage, x: torch.Tensor, down: tuple[bool, str]
    ) -> None:
        conv = stage.downsampling_layer[1]
        k = "x".join(map(str, conv.kernel_size))
        part = (
            f"downsampling_layer (LayerNorm + {k} conv): {conv.in_channels}->{conv.out_channels}, {x.dtype}"
        )
        bf16x3, why = down  # why is never empty for a stage with a downsampling layer
        if bf16x3:
            impl = "bf16x3 GEMM on the normalised patches (split bfloat16, our AMX kernel)"
            plan.note(stage, part, impl, why)
        else:
            plan.note(stage, part, "LayerNorm + oneDNN conv", f"not bf16x3: {why}")

    def _mlp_bf16x3(self, plan: Plan | None, stage: ConvNextStage, x: torch.Tensor) -> tuple[bool, str]:
        """(bf16x3?, why) for `stage`'s MLPs on inputs like `x` (the stage's downsampled input)."""
        if not stage.layers:
            return False, ""
        return mlp_bf16x3_decided(
            plan, stage, x, stage.layers[0].pwconv1.out_features, self.config["hidden_act"]
        )

    def _note_mlp(
        self, plan: Plan, stage: ConvNextStage, x: torch.Tensor, bf16x3: bool, why_bf16x3: str
    ) -> None:
        """The MLP path of `stage`'s layers on inputs like `x` (one note: its layers share shapes and
        activation): bf16x3 or not (`why_bf16x3`), else from `ConvNextLayer.onednn_mlp_blocker`; on the
        row-chunked path, its two Linears."""
        if not stage.layers:
            return
        layer, act = stage.layers[0], self.config["hidden_act"]
        fc1, fc2 = layer.folded()
        hidden, dim = fc1.weight.shape
        part = f"layers.*.pwconv1/pwconv2 (MLP): {dim}->{hidden}->{dim}, {x.dtype}"
        if bf16x3:
            note_mlp_bf16x3(plan, stage, part, why_bf16x3)
            return
        blocker = layer.onednn_mlp_blocker(x)
        if blocker is None:
            kind = "CPU float32" if x.dtype == torch.float32 else "bfloat16 on a CPU with native bf16"
            impl = f"oneDNN 1x1 convs, {act} + residual add fused"
            why = f"{kind}; see bench/results/decisions.md, ConvNeXt MLP"
            plan.note(stage, part, impl, f"{why} (not bf16x3: {why_bf16x3})" if why_bf16x3 else why)
            return
        plan.note(
            stage,
            part,
            "row-chunked LayerNorm + Linears (mlp_rows_)",
            f"{blocker} ({x.device.type}, {x.dtype})",
        )
        for name, lw, a in (("pwconv1", fc1, act), ("pwconv2", fc2, None)):
            impl, why = linear_plan(x, lw, a, fused=a is not None and layer.fused_act is not None)
            plan.note(
                stage, f"layers.*.{name}: {lw.weight.shape[1]}->{lw.weight.shape[0]}, {x.dtype}", impl, why
            )
