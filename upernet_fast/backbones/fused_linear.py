"""Inference Linear layers for the backbones: oneDNN or MKL, whichever measured faster for the shape.

On CPU float32, `torch.ops.mkldnn._linear_pointwise` with a weight reordered once into oneDNN's blocked
layout, the activation fused as a post-op, wins for narrow layers; the MKL sgemm behind `F.linear` (then
a separate GELU) wins once both dimensions reach 192. Measured per Swin-T layer shape in bench/results/decisions.md
("Backbone Linears"); oneDNN's erf-GELU post-op is what makes it lose from 192 features on. `ONEDNN_MAX_NARROW` is that rule.
Elsewhere (other devices/dtypes, builds without oneDNN, under torch.compile) it is `F.linear`. On CPUs with
AMX, a Linear without activation can run as a split-bfloat16 GEMM on our AMX kernel instead (`bf16x3`,
decided by `dispatch.linear_bf16x3_choice`; `kernels/gemm_bf16x3.py`).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..folding import cached
from ..kernels._common import LINEAR_POINTWISE as _LINEAR_POINTWISE
from ..kernels._common import onednn_blocker as onednn_unusable
from ..kernels.gemm_bf16x3 import conv1x1_bf16x3, pack_weight

_REORDER_LINEAR_WEIGHT = getattr(torch.ops.mkldnn, "_reorder_linear_weight", None)
MLP_CHUNK_ROWS = 1024  # CPU MLP row chunk: the 4C hidden stays in cache (bench/results/decisions.md)
ONEDNN_MAX_NARROW = 192  # oneDNN when min(in_features, out_features) is below this, else MKL (table above)
_PACK_BATCH_HINT = 1024  # oneDNN weight layout hint; measured insensitive (64..21888 rows)
# hidden_act -> oneDNN post-op (attr, algorithm) fused into `intermediate.dense`.
FUSED_ACT = {"gelu": ("gelu", "none"), "gelu_pytorch_tanh": ("gelu", "tanh"), "relu": ("relu", "")}


def onednn_blocker(x: torch.Tensor, bf16: bool = False) -> str | None:
    """Why oneDNN's fused ops cannot run on `x` here, or None when they can (`use_onednn`): where
    `kernels._common.onednn_blocker` allows oneDNN (bfloat16 only on a CPU with native bf16), float32 (and
    bfloat16 if `bf16`). Constant strings: this runs on every Linear call."""
    if _LINEAR_POINTWISE is None:
        return "this PyTorch build has no oneDNN pointwise ops"
    blocker = onednn_unusable(x)
    if blocker is not None:
        return blocker
    if x.dtype != torch.float32:
        if x.dtype != torch.bfloat16:
            return "the oneDNN path is for float32 and bfloat16"
        if not bf16:  # Swin-T measured: no gain, lower argmax agreement
            return "bfloat16 Linears stay on MKL, see bench/results/decisions.md, ConvNeXt MLP"
    return None


def use_onednn(x: torch.Tensor, bf16: bool = False) -> bool:
    """Whether oneDNN's fused ops run on `x` (see `onednn_blocker`)."""
    return onednn_blocker(x, bf16) is None


class LinearWeights:
    """Inference weights of one Linear: plain `weight`/`bias` and, on CPU fp32, a oneDNN-packed copy of the
    weight (an opaque tensor: no storage, so it cannot be deep-copied or pickled; both drop it, and the
    `folding.cached` key, which holds the source pointers, makes the copy rebuild it on first use), and the
    bf16x3 operand (`split`, built on first bf16x3 use; copies rebuild it too)."""

    __slots__ = ("weight", "bias", "packed", "onednn", "split")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, pack: bool = True) -> None:
        self.weight, self.bias, self.packed, self.split = weight, bias, None, None
        self.onednn = min(weight.shape) < ONEDNN_MAX_NARROW
        if pack and self.onednn and _REORDER_LINEAR_WEIGHT is not None and use_onednn(weight):
            try:
                self.packed = _REORDER_LINEAR_WEIGHT(weight.detach(), _PACK_BATCH_HINT)
            except RuntimeError:  # no packing on this build/CPU: the plain weight works too
                self.packed = None

    def __deepcopy__(self, memo: dict) -> LinearWeights:
        return LinearWeights(copy.deepcopy(self.weight, memo), copy.deepcopy(self.bias, memo), pack=False)

    def __reduce__(self):
        return (LinearWeights, (self.weight, self.bias, False))


def linear_onednn(x: torch.Tensor, lw: LinearWeights) -> bool:
    """Whether `linear(x, lw)` runs on oneDNN: the one test it branches on (and `linear_plan` reports)."""
    return lw.onednn and use_onednn(x)


def linear(
    x: torch.Tensor, lw: LinearWeights, act: tuple[str, str] | None = None, bf16x3: bool = False
) -> torch.Tensor:
    """`F.linear` (+ activation): oneDNN's inner product with the packed weight and fused activation for
    narrow layers on CPU fp32, MKL otherwise (see the module docstring). ``bf16x3`` (no activation; the
    caller's `dispatch.linear_bf16x3_choice`): rows (T, K) as a split-bfloat16 GEMM."""
    if bf16x3:
        if act is not None:
            raise ValueError("linear: bf16x3 is for Linears without activation")
        return linear_bf16x3(x, lw)
    if linear_onednn(x, lw):
        attr, algo = act if act is not None else ("none", "")
        weight = lw.packed if lw.packed is not None else lw.weight
        return _LINEAR_POINTWISE(x, weight, lw.bias, attr, [], algo)
    y = F.linear(x, lw.weight, lw.bias)
    if act is None:
        return y
    return F.relu(y) if act[0] == "relu" else F.gelu(y, approximate=act[1])


def linear_bf16x3(x: torch.Tensor, lw: LinearWeights) -> torch.Tensor:
    """`F.linear` of CPU float32 rows x (T, K) as one split-bfloat16 GEMM (``conv1x1_bf16x3`` on x viewed as
    a channels-last 1 x T map); the operand is packed on first use."""
    if lw.split is None:
        lw.split = pack_weight(lw.weight)
    t, k = x.shape
    rows = x.contiguous().view(1, 1, t, k).permute(0, 3, 1, 2)  # (1, K, 1, T) channels-last: no copy
    return conv1x1_bf16x3(rows, lw.split, lw.bias, False).permute(0, 2, 3, 1).reshape(t, -1)


def linear_plan(
    x: torch.Tensor,
    lw: LinearWeights,
    act: str | None = None,
    fused: bool = False,
    bf16x3: tuple[bool, str] | None = None,
) -> tuple[str, str]:
    """(implementation, why) of `linear` on inputs like `x`, for `FastUperNet.plan`: from the tests it
    branches on (`LinearWeights.onednn`, `onednn_blocker`). `act` names the activation that follows the
    Linear; `fused`: passed to `linear` as its oneDNN post-op (else applied separately); `bf16x3`: the
    caller's (choice, why) from `dispatch.linear_bf16x3_choice`."""
    if bf16x3 is not None and bf16x3[0]:
        return "bf16x3 GEMM (split bfloat16, our AMX kernel)", bf16x3[1]
    impl, why = _float32_linear_plan(x, lw, act, fused)
    return impl, why if bf16x3 is None else f"{why} (not bf16x3: {bf16x3[1]})"


def _float32_linear_plan(x: torch.Tensor, lw: LinearWeights, act: str | None, fused: bool) -> tuple[str, str]:
    mkl = "MKL F.linear" + (f" + {act}" if act else "")
    narrow, source = min(lw.weight.shape), "see bench/results/decisions.md, Backbone Linears"
    if not lw.onednn:
        return mkl, f"min(in, out) {narrow} >= ONEDNN_MAX_NARROW {ONEDNN_MAX_NARROW}; {source}"
    blocker = onednn_blocker(x)
    if blocker is not None:
        return mkl, f"{blocker} ({x.device.type}, {x.dtype})"
    impl = "oneDNN inner product" + (", packed weight" if lw.packed is not None else "")
    if act:
        impl += f", {act} fused" if fused else f" + {act}"
    return impl, f"min(in, out) {narrow} < ONEDNN_MAX_NARROW {ONEDNN_MAX_NARROW}; {source}"


def plain_weights(owner: nn.Module, name: str, linear: nn.Linear) -> LinearWeights:
    return cached(
        owner, name, [linear.weight, linear.bias], lambda: LinearWeights(linear.weight, linear.bias)
    )


@functools.lru_cache(maxsize=32)
def _unit_affine(c: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ones(c, dtype=dtype, device=device), torch.zeros(c, dtype=dtype, device=device)


def normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Affine-free LayerNorm over the last dim. Passes an explicit unit affine (exact: ×1, +0) because
    PyTorch's CPU kernel without weight/bias is slower."""
    weight, bias = _unit_affine(x.shape[-1], x.dtype, x.device)
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def mlp_rows_(
    out: torch.Tensor,
    inp: torch.Tensor,
    fc1: LinearWeights,
    fc2: LinearWeights,
    eps: float,
    fused_act: tuple[str, str] | None,
    act: Callable[[torch.Tensor], torch.Tensor],
    residual: torch.Tensor | None = None,
) -> None:
    """In place, rows (T, C): ``out = (residual if given else out) + fc2(act(fc1(layernorm(inp))))``, with an
    affine-free LayerNorm (its affine is folded into ``fc1``). Runs in row chunks on CPU so the 4C hidden
    stays in cache; ``out`` may be ``inp`` (each chunk is read before it is written)."""
    t = inp.shape[0]
    step = MLP_CHUNK_ROWS if inp.device.type == "cpu" else t
    for start in range(0, t, step):
        rows = slice(start, start + step)
        hidden = linear(normalize(inp[rows], eps), fc1, fused_act)
        if fused_act is None:
            hidden = act(hidden)
        y = linear(hidden, fc2)
        if residual is None:
            out[rows] += y
        else:
            torch.add(residual[rows], y, out=out[rows])
