"""Shared pieces of the kernel files: the optional Triton import, launch checks, and the bilinear
source-index rule that every resize in this package must reproduce bit for bit.

PyTorch's bilinear resize (``align_corners=False``, ``antialias=False``, output size given) maps output
index ``d`` to ``src = max(scale * (d + 0.5) - 0.5, 0)`` with ``scale = in / out`` computed in the op-math
type (float32 for float16/float32, float64 for float64); ATen's AVX2 CPU build evaluates ``scale * (d + 0.5)
- 0.5`` as one fused multiply-add (one rounding: with two roundings the C resize differed from
F.interpolate by 1e-5 at 48 -> 480 px, with one it is bitwise equal), so the float32 rule below does too; then ``i0 = min(floor(src), in - 1)``,
``i1 = i0 + (i0 < in - 1)``, ``l1 = clamp(src - i0, 0, 1)``, ``l0 = 1 - l1`` (ATen ``UpSample.h``), and
evaluates ``l0h * (l0w * x[i0, j0] + l1w * x[i0, j1]) + l1h * (l0w * x[i1, j0] + l1w * x[i1, j1])``.
"""

import os
from collections.abc import Callable, Mapping, Sequence
from functools import cache, lru_cache

import numpy as np
import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # the PyTorch paths must keep working without triton
    from types import SimpleNamespace

    HAS_TRITON = False
    # Just enough for the `@triton.jit` definitions below and in the op files to be importable.
    triton = SimpleNamespace(jit=lambda fn=None, **_: fn if fn is not None else (lambda f: f), cdiv=None)
    tl = SimpleNamespace(constexpr=int)


_ON, _OFF = ("1", "true", "on", "yes"), ("0", "false", "off", "no")


def env_switch(name: str, default: bool = True) -> bool:
    """The on/off environment switch ``name`` (``1/true/on/yes`` or ``0/false/off/no``, any case; unset or
    empty: ``default``). Every switch of this package is read here; anything else is a ``ValueError``."""
    value = os.environ.get(name, "").strip().lower()
    if not value:
        return default
    if value in _ON:
        return True
    if value in _OFF:
        return False
    raise ValueError(f"{name}={value!r} is not a switch; use 1 or 0 (or true/false, on/off, yes/no)")


ISA_ENV_VAR = "UPERNET_FAST_ISA"
ISA_LEVELS = ("baseline", "avx2", "avx512")  # ascending


def isa_cap() -> str | None:
    """``UPERNET_FAST_ISA`` (``avx2`` or ``baseline``; ``avx512`` or unset: no cap): run this package as on a
    CPU without the features above that level (AVX-512, AMX, native bf16; for ``baseline`` also AVX2/FMA), to
    test the paths another CPU kind takes. It only lowers: the real CPU's features are an upper bound.
    PyTorch's own kernels follow ``ATEN_CPU_CAPABILITY``, oneDNN ``ONEDNN_MAX_CPU_ISA``, MKL
    ``MKL_ENABLE_INSTRUCTIONS``."""
    value = os.environ.get(ISA_ENV_VAR, "").strip().lower()
    if not value or value == ISA_LEVELS[-1]:
        return None
    if value not in ISA_LEVELS:
        raise ValueError(f"{ISA_ENV_VAR}={value!r} is not an ISA level; use one of {', '.join(ISA_LEVELS)}")
    return value


def register_ops(
    name: str,
    impls: Mapping[str, Callable],
    fake: Callable | Mapping[str, Callable],
    mutates_args: tuple[str, ...] = (),
) -> dict[str, Callable]:
    """Register each implementation as its own ``torch.library`` op ``upernet_fast::<name>_<backend>``
    (so torch.compile traces through it as one opaque call) with its fake (shape/stride) function, one for
    all or one per backend; returns backend -> op. The op runs exactly that implementation: the choice of
    implementation is made once, by the caller (``upernet_fast.dispatch``), never inside the op."""
    ops = {}
    for backend, fn in impls.items():
        op = torch.library.custom_op(f"upernet_fast::{name}_{backend}", fn, mutates_args=mutates_args)
        op.register_fake(fake[backend] if isinstance(fake, Mapping) else fake)
        ops[backend] = op
    return ops


def interpreting() -> bool:
    """True when ``TRITON_INTERPRET`` is set: Triton then runs kernels in its CPU interpreter."""
    return env_switch("TRITON_INTERPRET", default=False)


def kernels_interpreted() -> bool:
    """True when this package's kernels were built for the interpreter. Triton decides at decoration
    time, so TRITON_INTERPRET must be set before ``upernet_fast.kernels`` is first imported."""
    if not HAS_TRITON:
        return False
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(bilinear_src, InterpretedFunction)


def check_triton_tensors(*tensors: torch.Tensor) -> None:
    """Raise a clear error before launching a Triton kernel on tensors it cannot run on."""
    if not HAS_TRITON:
        raise RuntimeError("backend 'triton' needs the `triton` package, which is not importable")
    for t in tensors:
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise RuntimeError(f"the Triton kernels take float16/bfloat16/float32 tensors, got {t.dtype}")
        if t.is_cuda:
            continue
        if not (interpreting() and kernels_interpreted()):
            raise RuntimeError(
                "Triton kernels on CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 in the "
                "environment before importing upernet_fast (or use backend='torch')"
            )
        if t.dtype == torch.bfloat16:
            raise RuntimeError("the Triton interpreter has no bfloat16; use float16/float32 on CPU")


def out_memory_format(x: torch.Tensor) -> torch.memory_format:
    """The layout every op returns for input ``x`` (fake and real implementations must agree on strides)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def bilinear_scale(in_size: int, out_size: int) -> float:
    """``in / out`` rounded exactly as ATen's float32 op-math does it (for the Triton kernels)."""
    return float(np.float32(in_size) / np.float32(out_size))


@lru_cache(maxsize=256)
def _bilinear_indices_cached(
    in_size: int, out_size: int, shift: int, dtype: torch.dtype, device: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    op = opmath_dtype(dtype)
    d = torch.arange(out_size, dtype=torch.int64) + shift
    valid = (d >= 0) & (d < out_size)
    d = d.clamp(0, out_size - 1)
    scale = torch.tensor(in_size, dtype=op) / torch.tensor(out_size, dtype=op)
    if op == torch.float32:  # fma(scale, d + 0.5, -0.5): exact product and sum in float64, one rounding
        src = (scale.double() * (d.double() + 0.5) - 0.5).float().clamp_min(0)
    else:
        src = (scale * (d.to(op) + 0.5) - 0.5).clamp_min(0)
    i0 = src.floor().to(torch.int64).clamp_max(in_size - 1)
    i1 = i0 + (i0 < in_size - 1).to(torch.int64)
    l1 = (src - i0.to(op)).clamp(0, 1)
    l0 = 1 - l1
    # Zero weights where the shifted position falls outside the output: the conv's zero padding.
    l0 = torch.where(valid, l0, 0)
    l1 = torch.where(valid, l1, 0)
    dev = torch.device(device)
    return i0.to(dev), i1.to(dev), l0.to(dev), l1.to(dev)


def bilinear_indices(
    in_size: int, out_size: int, dtype: torch.dtype, device: torch.device, shift: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices ``i0, i1`` (int64) and weights ``l0, l1`` (op-math dtype) of output positions
    ``d + shift`` for ``d`` in ``range(out_size)``; weights are 0 where ``d + shift`` is outside the output."""
    return _bilinear_indices_cached(in_size, out_size, shift, dtype, str(torch.device(device)))


@triton.jit
def plane_block(C, H, W, BLOCK: tl.constexpr):
    """The shared prologue of the per-plane elementwise kernels (grid: (pixel blocks, batch x channels)):
    image index b (int64, for large strides), channel c, this program's output rows Y and columns X, and
    the mask of pixels inside the H x W plane."""
    pid = tl.program_id(0)
    bc = tl.program_id(1)
    b = (bc // C).to(tl.int64)
    c = bc % C
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < H * W
    return b, c, offs // W, offs % W, mask


@triton.jit
def bilinear_src(dst, in_size, scale):
    """Triton twin of ATen's index rule: (i0, i1, l0, l1) for int32 output indices ``dst``."""
    src = scale * (dst.to(tl.float32) + 0.5) - 0.5
    src = tl.maximum(src, 0.0)
    i0 = tl.minimum(src.to(tl.int32), in_size - 1)  # src >= 0, so truncation is floor
    i1 = tl.where(i0 < in_size - 1, i0 + 1, i0)
    l1 = tl.minimum(tl.maximum(src - i0.to(tl.float32), 0.0), 1.0)
    l0 = 1.0 - l1
    return i0, i1, l0, l1


@triton.jit
def bilerp(base, i0, i1, j0, j1, l0h, l1h, l0w, l1w, s_h, s_w, mask):
    """ATen's bilinear blend of the four neighbours at row/col indices (i, j) of one channel plane."""
    v00 = tl.load(base + i0 * s_h + j0 * s_w, mask=mask, other=0.0).to(tl.float32)
    v01 = tl.load(base + i0 * s_h + j1 * s_w, mask=mask, other=0.0).to(tl.float32)
    v10 = tl.load(base + i1 * s_h + j0 * s_w, mask=mask, other=0.0).to(tl.float32)
    v11 = tl.load(base + i1 * s_h + j1 * s_w, mask=mask, other=0.0).to(tl.float32)
    return l0h * (l0w * v00 + l1w * v01) + l1h * (l0w * v10 + l1w * v11)


@cache
def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX, as oneDNN reports it)."""
    if isa_cap() is not None:  # native bf16 needs AVX-512 (AVX512-BF16) or AMX
        return False
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check is not None and torch.backends.mkldnn.is_available() and check())


# oneDNN's convolution with fused post-ops (None in builds without it), shared by the ops' 1x1/3x3 convs
# and the ConvNeXt MLP.
CONV_POINTWISE = getattr(torch.ops.mkldnn, "_convolution_pointwise", None)
# ... and its Linear with fused post-ops (the Swin Linears)
LINEAR_POINTWISE = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
_REORDER_CONV_WEIGHT = getattr(torch._C._nn, "mkldnn_reorder_conv2d_weight", None)


def onednn_prepacked(
    weight: torch.Tensor, input_shape: Sequence[int], padding: int = 0, stride: int = 1
) -> torch.Tensor:
    """A (Cout, Cin, kh, kw) ``CONV_POINTWISE`` weight for inputs of ``input_shape`` (B, Cin, H, W), in
    oneDNN's own blocked layout (an opaque mkldnn tensor) where this build can make one, so the conv skips
    its per-call weight reorder; else ``weight`` itself. Bitwise the same output. Xeon with AMX, bf16:
    3x3 512->512 at 128² 28.2 -> 25.1 ms, at 32² 2.7 -> 1.9 ms, 768->512 at 16² 2.5 -> 1.0 ms, 1x1
    3072->768 at 16² 1.22 -> 0.58 ms (bench/results/decisions.md, "Prepacked oneDNN weights"). Eager
    inference only (the opaque tensor has no autograd and does not trace)."""
    if _REORDER_CONV_WEIGHT is None or not torch.backends.mkldnn.is_available():
        return weight
    p, s, one = [padding, padding], [stride, stride], [1, 1]
    return _REORDER_CONV_WEIGHT(weight.contiguous().to_mkldnn(), p, s, one, 1, list(input_shape))


def onednn_blocker(x: torch.Tensor) -> str | None:
    """Why oneDNN's fused-post-op convolutions and Linears cannot run on ``x`` here, or None when they can:
    eager, CPU, oneDNN enabled and available. (Under torch.compile the plain ops are traced instead:
    Inductor fuses those itself, and dynamo refuses to trace ``torch.backends.mkldnn.is_available``.)
    bfloat16 only on a CPU with native bf16: elsewhere oneDNN refuses bf16 convs ("bf16 path needs the cpu
    support ...") and would emulate bf16 Linears. The one place for these conditions; callers add their own
    dtype and layout rules."""
    if torch.compiler.is_compiling():
        return "torch.compile traces the plain ops"
    if x.device.type != "cpu":
        return "not on CPU"
    if not torch.backends.mkldnn.enabled:
        return "oneDNN switched off (torch.backends.mkldnn.enabled)"
    if not torch.backends.mkldnn.is_available():
        return "oneDNN is not available"
    if x.dtype == torch.bfloat16 and not native_bf16():
        return "bfloat16 on a CPU without native bf16 (AVX512-BF16/AMX): oneDNN would refuse or emulate it"
    return None
