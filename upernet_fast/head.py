"""UPerNet decode head and auxiliary FCN head: transformers' modules and parameter names, fast forward.

Reference semantics (transformers `UperNetHead`): laterals (1x1 conv-BN-ReLU) on levels 0..N-2; a
pyramid-pooling module on level N-1 whose branches are upsampled, concatenated with the input and fused by
a 3x3 `bottleneck`; a top-down path `lat[i-1] += up(lat[i])`; 3x3 `fpn_convs` on levels 0..N-2; every
level upsampled to level 0, concatenated, fused by the 3x3 `fpn_bottleneck`; a 1x1 `classifier`.

Exact rewrite used here (README "How it is fast"): a 3x3 zero-padded conv over a bilinearly upsampled input equals
the sum over the nine taps of shift(upsample(W_tap · x)). So the upsampled groups of `fpn_bottleneck`'s
and `bottleneck`'s inputs are channel-mixed at their own low resolution and never materialised at high
resolution, and the concatenations disappear (the conv weight is split per input group instead).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import dispatch
from .config import AUXILIARY_LEVEL, UperNetConfig
from .folding import cached, fold_batchnorm, precise
from .kernels.conv_bn_relu import conv1x1_nchw_possible, conv1x1_to_nchw

_ACCUMULATE_IN_FLOAT32 = (torch.bfloat16, torch.float16)


def logits_dtype(dtype: torch.dtype) -> torch.dtype:
    """The logits' dtype for a model in `dtype`: float32 for bf16/fp16 (see `UperNetHead.classify`)."""
    return torch.float32 if dtype in _ACCUMULATE_IN_FLOAT32 else dtype


def _default_ops(x: torch.Tensor, ops: dispatch.Ops | None) -> dispatch.Ops:
    return dispatch.ops_for(None, x.device) if ops is None else ops


def _taps_name(i: int, feat: torch.Tensor) -> str:
    """Plan/cache name of the taps conv of the ``i``-th low-resolution group ``feat`` of a bottleneck."""
    return f"taps{i}_{feat.shape[2]}x{feat.shape[3]}"


class UperNetConvModule(nn.Module):
    """Conv2d(bias=False) → BatchNorm2d → ReLU; evaluated as one conv with the BN folded in."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, padding: int = 0, dilation: int = 1
    ):
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, padding=padding, bias=False, dilation=dilation
        )
        self.batch_norm = nn.BatchNorm2d(out_channels)
        self.activation = nn.ReLU()

    @property
    def sources(self) -> list[torch.Tensor]:
        """The parameters and buffers every folded weight of this module derives from."""
        bn = self.batch_norm
        return [self.conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var]

    def folded(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The BN-folded (weight, bias) in `dtype` (default: the parameters'), folded in float64."""
        dtype = dtype or self.conv.weight.dtype
        name = "bn" if dtype == self.conv.weight.dtype else f"bn_{dtype}"
        return cached(
            self, name, self.sources, lambda: fold_batchnorm(self.conv.weight, None, self.batch_norm, dtype)
        )

    def forward(
        self, x: torch.Tensor, ops: dispatch.Ops | None = None, low: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``low``: of ``x + resize_bilinear(low, x's size)`` (UPerNet's top-down sum; formed inside the conv's
        Winograd transform where it runs as one, see ``dispatch.Ops.conv``)."""
        w, b = self.folded(x.dtype)  # computes in its input's dtype (the PPM of a bf16 model: float32)
        c = self.conv
        ops = _default_ops(x, ops)
        if c.dilation != (1, 1) or c.kernel_size[0] not in (1, 3) or c.padding[0] != c.padding[1]:
            x = x if low is None else ops.topdown_add(x, low)
            return F.relu(F.conv2d(x, w, b, padding=c.padding, dilation=c.dilation))
        return ops.conv(self, "conv", self.sources, x, w, b, c.padding[0], True, low)


class UperNetPyramidPoolingBlock(nn.Module):
    """Holds the branch conv under transformers' name `psp_modules.{i}.1` (index 0 was the pooling)."""

    def __init__(self, pool_scale: int, in_channels: int, channels: int) -> None:
        super().__init__()
        self.pool_scale = pool_scale
        self.add_module("1", UperNetConvModule(in_channels, channels, kernel_size=1))

    @property
    def conv_module(self) -> UperNetConvModule:
        return getattr(self, "1")


class UperNetHead(nn.Module):
    def __init__(self, config: UperNetConfig, in_channels: list[int]) -> None:
        super().__init__()
        self.pool_scales = list(config.pool_scales)
        self.in_channels = list(in_channels)
        self.channels = config.hidden_size
        self.classifier = nn.Conv2d(self.channels, config.num_labels, kernel_size=1)
        self.psp_modules = nn.ModuleList(
            UperNetPyramidPoolingBlock(s, self.in_channels[-1], self.channels) for s in self.pool_scales
        )
        self.bottleneck = UperNetConvModule(
            self.in_channels[-1] + len(self.pool_scales) * self.channels, self.channels, 3, padding=1
        )
        self.lateral_convs = nn.ModuleList(
            UperNetConvModule(c, self.channels, 1) for c in self.in_channels[:-1]
        )
        self.fpn_convs = nn.ModuleList(
            UperNetConvModule(self.channels, self.channels, 3, padding=1) for _ in self.in_channels[:-1]
        )
        self.fpn_bottleneck = UperNetConvModule(
            len(self.in_channels) * self.channels, self.channels, 3, padding=1
        )

    def _split_bottleneck(
        self, module: UperNetConvModule, first: int, n_low: int, dtype: torch.dtype | None = None
    ) -> tuple:
        """Folded weight of a 3x3 bottleneck (in `dtype`, default the parameters') split into the directly
        convolved first group and the tap weights of `n_low` upsampled groups of `self.channels` each."""

        def build() -> tuple:
            w, b = module.folded(dtype)
            bounds = [first + i * self.channels for i in range(n_low + 1)]
            taps = [dispatch.taps_weight(w[:, lo:hi]) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
            return w[:, :first].contiguous(), b, taps

        suffix = "" if dtype in (None, module.conv.weight.dtype) else f"_{dtype}"
        return cached(module, f"split{first}_{n_low}{suffix}", module.sources, build)

    def _fused_bottleneck(
        self,
        module: UperNetConvModule,
        direct: torch.Tensor,
        low: list[torch.Tensor],
        ops: dispatch.Ops,
    ) -> torch.Tensor:
        """`module(cat([direct, *(upsample(t) for t in low)]))` without the upsampled concat: the direct
        group is convolved at full size, each low-resolution group is mixed into its nine taps at its own
        size and upsample-shift-added into the same buffer (module docstring). When the direct conv runs as
        Winograd and `dispatch.merge_into_winograd` says so, the first low group is instead upsampled and
        convolved inside that Winograd conv (fewer GEMM flops than its float32 taps with F(6x6); not when the
        taps run as a bf16x3 GEMM on AMX)."""
        w_direct, bias, w_taps = self._split_bottleneck(module, direct.shape[1], len(low), direct.dtype)
        size = direct.shape[2:]
        name = f"direct{direct.shape[1]}_{len(low)}"
        choice = ops.choice(module, name, direct, w_direct, 1)
        merge = bool(low) and dispatch.merge_into_winograd(choice[0], low[0].shape[2:], size)
        if merge:  # worth it against float32 taps; against taps as a bf16x3 GEMM (AMX) it may not be
            taps_split = ops.split_choice(module, _taps_name(0, low[0]), low[0], w_taps[0], 0)[0]
            merge = dispatch.merge_into_winograd(choice[0], low[0].shape[2:], size, taps_split)
        if merge:
            first = direct.shape[1]
            up = ops.resize_bilinear(low[0], size).to(direct.dtype)
            merged = lambda: module.folded(direct.dtype)[0][:, : first + self.channels]  # noqa: E731
            out = ops.conv_pair(
                module, f"merged{first}_{len(low)}", module.sources, direct, up, merged, bias, choice
            )
            low, w_taps = low[1:], w_taps[1:]
        else:
            out = ops.conv(module, name, module.sources, direct, w_direct, bias, 1, False)
        if not low:
            return F.relu_(out)
        taps = []
        for i, (feat, wt) in enumerate(zip(low, w_taps, strict=True)):
            ops.note(
                module,
                f"upsampled group {feat.shape[1]} ch @ {feat.shape[2]}x{feat.shape[3]} -> {size[0]}x{size[1]}",
                "low-resolution taps + upsample-shift-add",
                "exact rewrite (conv3x3 of an upsampled map = shift-add of upsampled taps)",
            )
            taps.append(ops.conv(module, _taps_name(i, feat), module.sources, feat, wt, None, 0, False))
        # direct conv + every group's shift-add + ReLU, summed in float32 for bf16/fp16 compute (one rounding
        # fewer per group); on CPU one pass writing each output pixel once
        if ops.plan is not None and not ops.plan.frozen and not torch.compiler.is_compiling():
            impl, why = dispatch.usa_sum_choice(ops, out, taps)  # (its CPU checks do not trace)
            part = f"direct conv + {len(taps)} upsampled group(s) + ReLU @ {size[0]}x{size[1]}"
            ops.note(module, part, impl, why)
        return ops.upsample_shift_add_sum(out, taps, relu=True)

    def psp_forward(self, x: torch.Tensor, ops: dispatch.Ops | None = None) -> torch.Tensor:
        """The pyramid-pooling module. In a bf16/fp16 model it runs in float32 (weights folded from the
        model's own parameters in float64, input widened, output rounded back): it works on the smallest
        map, so this costs little, and its error feeds every level of the top-down path: in bf16 it
        cost Swin-T the most argmax agreement with fp32 (bench/results/decisions.md, "bf16 PPM")."""
        ops = _default_ops(x, ops)
        xc = x.float() if x.dtype in _ACCUMULATE_IN_FLOAT32 else x
        pooled = ops.adaptive_pool_multi(xc, self.pool_scales)
        branches = [block.conv_module(p, ops) for block, p in zip(self.psp_modules, pooled, strict=True)]
        return self._fused_bottleneck(self.bottleneck, xc, branches, ops).to(x.dtype)

    def classify(self, fused: torch.Tensor, ops: dispatch.Ops | None = None) -> torch.Tensor:
        """The 1x1 `classifier`; float32 logits for a bf16/fp16 model. There the fused
        features arrive in float32 (the bottleneck accumulates in float32) and the classifier runs in
        float32 on them (its weight widened once): a few percent of the bf16 forward for a higher argmax
        agreement with fp32 (bench/results/decisions.md, "bf16 classifier")."""
        c = self.classifier
        if c.weight.dtype not in _ACCUMULATE_IN_FLOAT32:  # float32/float64: the model's own dtype
            w, b, x = c.weight, c.bias, fused.to(c.weight.dtype)
        else:
            w, b = cached(
                self,
                "classifier_fp32",
                [c.weight, c.bias],
                lambda: (precise(c.weight).float(), precise(c.bias).float()),
            )
            x = fused.float()
        direct = conv1x1_nchw_possible(x, w)
        if ops is not None:
            part = f"classifier: {w.shape[1]}->{w.shape[0]} 1x1 @ {x.shape[2]}x{x.shape[3]}, {x.dtype}"
            impl = "MKL GEMM W @ Xᵀ straight into NCHW logits" if direct else "F.conv2d"
            why = (
                "the logits' resize reads NCHW (decisions.md, Logits layout)"
                if direct
                else "not eager CPU float32"
            )
            ops.note(self, part, impl, why + ("; float32 in a bf16 model" if fused.dtype != x.dtype else ""))
        if direct:  # the logits go on to the resize as NCHW: write them so directly
            return conv1x1_to_nchw(x, w, b)
        return F.conv2d(x, w, b)

    def forward(
        self, encoder_hidden_states: tuple[torch.Tensor, ...], ops: dispatch.Ops | None = None
    ) -> torch.Tensor:
        ops = _default_ops(encoder_hidden_states[0], ops)
        laterals = [conv(encoder_hidden_states[i], ops) for i, conv in enumerate(self.lateral_convs)]
        laterals.append(self.psp_forward(encoder_hidden_states[-1], ops))
        n = len(laterals)
        for i in range(n - 1, 1, -1):
            laterals[i - 1] = ops.topdown_add(laterals[i - 1], laterals[i])
        if n == 1:  # a one-level backbone: the PPM output is fpn_bottleneck's whole input
            return self.classify(self._fused_bottleneck(self.fpn_bottleneck, laterals[0], [], ops), ops)
        # level 0's top-down sum is fpn_convs[0]'s input only: formed inside its conv (its Winograd
        # transform, where it runs as one: the largest map of the head is then never written)
        fpn_outs = [self.fpn_convs[0](laterals[0], ops, low=laterals[1])]
        fpn_outs += [self.fpn_convs[i](laterals[i], ops) for i in range(1, n - 1)]
        fused = self._fused_bottleneck(self.fpn_bottleneck, fpn_outs[0], [*fpn_outs[1:], laterals[-1]], ops)
        return self.classify(fused, ops)


class UperNetFCNHead(nn.Module):
    """Auxiliary FCN head; only run when labels are given (its output only feeds the loss)."""

    def __init__(
        self, config: UperNetConfig, in_channels: list[int], in_index: int = AUXILIARY_LEVEL
    ) -> None:
        super().__init__()
        self.in_index = in_index
        self.in_channels = (
            in_channels[in_index] if config.auxiliary_in_channels is None else config.auxiliary_in_channels
        )
        self.channels = config.auxiliary_channels
        self.concat_input = config.auxiliary_concat_input
        n = config.auxiliary_num_convs
        convs = [
            UperNetConvModule(self.in_channels if i == 0 else self.channels, self.channels, 3, padding=1)
            for i in range(n)
        ]
        self.convs = nn.Sequential(*convs) if n > 0 else nn.Identity()
        if self.concat_input:
            self.conv_cat = UperNetConvModule(self.in_channels + self.channels, self.channels, 3, padding=1)
        self.classifier = nn.Conv2d(self.channels, config.num_labels, kernel_size=1)

    def forward(
        self, encoder_hidden_states: tuple[torch.Tensor, ...], ops: dispatch.Ops | None = None
    ) -> torch.Tensor:
        if len(encoder_hidden_states) <= self.in_index:
            raise ValueError(
                f"the auxiliary head (for the loss) reads backbone level {self.in_index}, but the backbone "
                f"gives {len(encoder_hidden_states)} level(s); transformers fails here too"
            )
        x = encoder_hidden_states[self.in_index]
        ops = _default_ops(x, ops)
        out = x
        for conv in self.convs if isinstance(self.convs, nn.Sequential) else ():
            out = conv(out, ops)
        if self.concat_input:
            out = self.conv_cat(torch.cat([x, out], dim=1), ops)
        return self.classifier(out)
