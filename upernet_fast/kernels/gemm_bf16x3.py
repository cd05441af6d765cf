"""Float32 GEMMs as split-bfloat16 GEMMs on AMX, with a float32 result (CPU): the ConvNeXt block MLP
(``mlp_bf16x3_``) and 1x1 convs (``conv1x1_bf16x3``).

The split is bf16x3's (see ``bf16x3.py``): GEMM inputs and weights become ``hi + lo`` bfloat16 pairs and
bfloat16 GEMMs with float32 accumulation sum ``hi W_hi + lo W_hi + hi W_lo`` and write float32 (no remainder
pass, unlike the 3x3 convs of ``bf16x3.py``). Where the CPU has AMX and the C helpers built with it, the GEMM
is our own AMX kernel (``amx_gemm`` in ``csrc/gemm_bf16x3.c``) on ``[hi | lo]`` rows and ``[W_hi; W_lo]``
packed once into tiles (``pack_weight``). Elsewhere (or with ``UPERNET_FAST_AMX_GEMM=0``) it is MKL's
``cblas_gemm_bf16bf16f32``, which PyTorch's libtorch_cpu exports (AMX kernels inside) but no PyTorch op
exposes, as ONE GEMM of ``[hi | lo | hi]`` rows and ``[W_hi; W_hi; W_lo]``; MKL repacks the weight into
AMX tiles on every call, and ours ran 1.2-2x faster on the shapes used here (decisions.md, "Own AMX GEMM").
The packed weight's layout says which GEMM runs. Both are called from C (``csrc/gemm_bf16x3.c``), which
also does the split passes (the MLP's fused with LayerNorm and with bias + GELU) over row chunks that stay
in cache.

Why: on a Xeon with AMX-BF16 that GEMM runs at 600-1100 GMAC/s on MKL, 1100-1600 on ours, against MKL
float32's 130-180, so the three-term product beats float32 1.5-3x; the block MLPs (ConvNeXt-T: 22 of its 23 GMACs) are the
float32 path's largest cost after the head's Winograd GEMMs (bench/results/decisions.md, "ConvNeXt MLP
as bf16x3"). Error: ~4e-6 of the output's scale (float32: ~6e-7); ConvNeXt-T logits are as close to
transformers as before (the head's Winograd error dominates). Not for Winograd's GEMMs: the inverse
transform amplifies the split's error to 1.5-2e-4 (decisions.md).

Whether they run is decided in ``upernet_fast.dispatch`` (``mlp_bf16x3_choice``, ``bf16x3_choice``).
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from . import native
from ._common import env_switch, register_ops
from ._memory import empty_output
from .bf16x3 import split_bf16

__all__ = [
    "AMX_ENV_VAR",
    "amx_gemm_available",
    "conv1x1_bf16x3",
    "gemm_bf16bf16f32",
    "gemm_bf16x3_blocker",
    "mlp_bf16x3_",
    "pack_weight",
    "packed_shape",
]

# Our AMX GEMM kernel instead of MKL's for the weights packed from now on (default on where it can run).
AMX_ENV_VAR = "UPERNET_FAST_AMX_GEMM"

# Rows per chunk. Fewer re-read the weights too often (each chunk streams both from memory), more spill
# the chunk's hidden activations out of cache: on a Xeon with AMX-BF16, 512 was best or within 5% of it
# at each ConvNeXt-T stage (128-2048 rows and whole maps measured; bench/results/decisions.md).
CHUNK_ROWS = 512
# The same for a 1x1 conv (one GEMM per chunk, no hidden layer): 1024 was faster than 256 and 512 for the
# head's 1x1 convs (512->4608 at 32²: 7.8 / 12.8 / 9.8 ms).
LINEAR_CHUNK_ROWS = 1024


@functools.cache
def gemm_bf16bf16f32() -> int | None:
    """Address of MKL's ``cblas_gemm_bf16bf16f32`` in PyTorch's libtorch_cpu, or None (builds without MKL,
    other platforms)."""
    for lib in sorted((Path(torch.__file__).parent / "lib").glob("libtorch_cpu*")):  # loaded already
        try:
            fn = ctypes.CDLL(str(lib)).cblas_gemm_bf16bf16f32
        except (OSError, AttributeError):
            continue
        return ctypes.cast(fn, ctypes.c_void_p).value
    return None


def gemm_bf16x3_blocker(x: torch.Tensor) -> str | None:
    """Why ``mlp_bf16x3_`` / ``conv1x1_bf16x3`` cannot run on ``x`` here, or None when it can. Only whether
    it is possible: AMX (without it bf16x3 is slower than float32) and the rest are the caller's to check."""
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return "bf16x3 GEMMs are for CPU float32"
    if native.library() is None:
        return "the native C helpers are unavailable"
    if gemm_bf16bf16f32() is None:
        return "this PyTorch build exports no MKL cblas_gemm_bf16bf16f32"
    return None


@functools.cache
def _amx_granted() -> bool:
    lib = native.library()
    return lib is not None and {"amx_bf16", "amx_tile"} <= native.cpu_flags() and lib.amx_request() == 1


def amx_gemm_available() -> bool:
    """Whether ``pack_weight`` packs for our AMX kernel: the CPU has AMX-BF16, the C helpers built with the
    kernel, Linux granted this process the tile state, and ``UPERNET_FAST_AMX_GEMM`` is not 0."""
    return env_switch(AMX_ENV_VAR) and _amx_granted()


def pack_weight(weight: torch.Tensor, amx: bool | None = None) -> torch.Tensor:
    """(N, K) Linear weight -> the split bfloat16 GEMM operand: for MKL ``[W_hi; W_hi; W_lo]`` (3K x N
    row-major, Wᵀ split); for our AMX kernel (``amx``, default ``amx_gemm_available()`` where K and N are
    multiples of 32) ``[W_hi; W_lo]`` (2K x N) as tiles, shape (N/16, 2K/32, 16, 32): tile (j, i) row r holds
    rows 32i + 2r, 32i + 2r + 1 of columns 16j .. 16j + 15, interleaved in pairs (TDPBF16PS's operand)."""
    hi, lo = split_bf16(weight.detach().float().t())
    k, n = hi.shape
    if amx is None:
        amx = amx_gemm_available() and k % 32 == 0 and n % 32 == 0
    if not amx:
        return torch.cat([hi, hi, lo], 0).contiguous()
    if k % 32 or n % 32:
        raise ValueError(f"pack_weight: the AMX layout needs K and N divisible by 32, got K={k}, N={n}")
    b = torch.cat([hi, lo], 0)
    return (
        b.view(2 * k // 32, 16, 2, n // 16, 16).permute(3, 0, 1, 4, 2).reshape(n // 16, 2 * k // 32, 16, 32)
    )


def packed_shape(packed: torch.Tensor) -> tuple[int, int]:
    """(3K, N) of a ``pack_weight`` result, whichever its layout."""
    if packed.dim() == 4:
        return packed.shape[1] * 48, packed.shape[0] * 16
    return tuple(packed.shape)


def _pieces(packed: torch.Tensor) -> int:
    """Split pieces per GEMM input row the packed weight's GEMM takes: [hi | lo] (ours), [hi | lo | hi] (MKL)."""
    return 2 if packed.dim() == 4 else 3


def _gemm_address(packed: torch.Tensor, op: str) -> int | None:
    """The GEMM the C code calls for this weight: MKL's address, or None (NULL) for our AMX kernel, which
    must not run where the CPU or the kernel (Linux's tile permission) cannot: that would be SIGILL."""
    if packed.dim() != 4:
        return gemm_bf16bf16f32()
    if not _amx_granted():
        raise ValueError(f"{op}: the weights are packed for the AMX kernel, which cannot run in this process")
    return None


def _rows(t: torch.Tensor, name: str, c: int, op: str = "mlp_bf16x3_") -> None:
    if t.dim() != 4 or t.shape[1] != c or not t.is_contiguous(memory_format=torch.channels_last):
        raise ValueError(f"{op}: {name} must be a channels-last (B, {c}, H, W) map, got {tuple(t.shape)}")


def _mlp_bf16x3_torch(
    y: torch.Tensor,
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    eps: float,
) -> None:
    blocker = gemm_bf16x3_blocker(y)
    if blocker is not None:
        raise ValueError(f"mlp_bf16x3_: {blocker}")
    c = y.shape[1]
    _rows(y, "y", c)
    _rows(x, "x", c)
    if x.shape != y.shape or x.dtype != y.dtype:
        raise ValueError(f"mlp_bf16x3_: x {x.dtype} {tuple(x.shape)} must match y {y.dtype} {tuple(y.shape)}")
    n = packed_shape(w1)[1]
    if (
        w1.dtype != torch.bfloat16
        or w2.dtype != torch.bfloat16
        or packed_shape(w1) != (3 * c, n)
        or packed_shape(w2) != (3 * n, c)
        or w1.dim() != w2.dim()
        or not (w1.is_contiguous() and w2.is_contiguous())
        or tuple(b1.shape) != (n,)
        or tuple(b2.shape) != (c,)
    ):
        raise ValueError(
            f"mlp_bf16x3_: weights must be pack_weight() of ({n}, {c}) and ({c}, {n}) Linear weights with "
            f"biases ({n},), ({c},), in one layout; got {tuple(w1.shape)} {w1.dtype}, {tuple(w2.shape)} {w2.dtype}, "
            f"{tuple(b1.shape)}, {tuple(b2.shape)}"
        )
    rows = y.numel() // c
    threads = torch.get_num_threads()
    chunk = max(1, min(rows, CHUNK_ROWS))
    a1 = empty_output((chunk * _pieces(w1) * c,), dtype=torch.bfloat16, device=y.device)
    hidden = empty_output((chunk * n,), dtype=torch.float32, device=y.device)
    a2 = empty_output((chunk * _pieces(w1) * n,), dtype=torch.bfloat16, device=y.device)
    tmp = empty_output((threads * max(n, c),), dtype=torch.float32, device=y.device)
    b1, b2 = b1.float().contiguous(), b2.float().contiguous()
    native.library().bf16x3_convnext_mlp(
        y.data_ptr(), x.data_ptr(), rows, c, n, eps, w1.data_ptr(), b1.data_ptr(), w2.data_ptr(),
        b2.data_ptr(), chunk, a1.data_ptr(), hidden.data_ptr(), a2.data_ptr(), tmp.data_ptr(),
        _gemm_address(w1, "mlp_bf16x3_"), threads,
    )  # fmt: skip


def _conv1x1_bf16x3_torch(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, relu: bool
) -> torch.Tensor:
    blocker = gemm_bf16x3_blocker(x)
    if blocker is not None:
        raise ValueError(f"conv1x1_bf16x3: {blocker}")
    if x.dim() != 4:
        raise ValueError(f"conv1x1_bf16x3: x must be a (B, K, H, W) map, got {tuple(x.shape)}")
    k = x.shape[1]
    _rows(x, "x", k, "conv1x1_bf16x3")
    n = packed_shape(packed)[1]
    if packed.dtype != torch.bfloat16 or packed_shape(packed) != (3 * k, n) or not packed.is_contiguous():
        raise ValueError(
            f"conv1x1_bf16x3: packed must be pack_weight() of an (N, {k}) weight, got {packed.dtype} "
            f"{tuple(packed.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"conv1x1_bf16x3: bias must have shape ({n},), got {tuple(bias.shape)}")
    b, _, h, w = x.shape
    out = empty_output((b, h, w, n), dtype=torch.float32, device=x.device)
    rows = b * h * w
    chunk = max(1, min(rows, LINEAR_CHUNK_ROWS))
    abuf = empty_output((chunk * _pieces(packed) * k,), dtype=torch.bfloat16, device=x.device)
    bias = None if bias is None else bias.float().contiguous()
    native.library().bf16x3_linear(
        x.data_ptr(), rows, k, n, packed.data_ptr(), None if bias is None else bias.data_ptr(), int(relu),
        out.data_ptr(), chunk, abuf.data_ptr(), _gemm_address(packed, "conv1x1_bf16x3"), torch.get_num_threads(),
    )  # fmt: skip
    return out.permute(0, 3, 1, 2)


def _conv1x1_fake(x, packed, bias, relu):
    shape = (x.shape[0], packed_shape(packed)[1], *x.shape[2:])
    return torch.empty(shape, dtype=torch.float32, device=x.device, memory_format=torch.channels_last)


# Registered ops (``upernet_fast::mlp_bf16x3_torch``, ``upernet_fast::conv1x1_bf16x3_torch``): opaque to
# torch.compile, and the profiler records them with their shapes (bench/macs.py counts their MACs; the MKL
# calls inside are not PyTorch ops).
MLP_BF16X3 = register_ops("mlp_bf16x3", {"torch": _mlp_bf16x3_torch}, lambda *a: None, mutates_args=("y",))
CONV1X1_BF16X3 = register_ops("conv1x1_bf16x3", {"torch": _conv1x1_bf16x3_torch}, _conv1x1_fake)


def mlp_bf16x3_(
    y: torch.Tensor,
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """In place: ``y <- x + b2 + gelu(layernorm(y) @ W1ᵀ + b1) @ W2ᵀ`` per pixel (affine-free LayerNorm over
    channels, erf GELU), for channels-last CPU float32 maps ``y`` and ``x`` (B, C, H, W); ``w1 =
    pack_weight(W1)`` (W1: (N, C)), ``w2 = pack_weight(W2)`` (W2: (C, N)). Returns ``y``."""
    MLP_BF16X3["torch"](y, x, w1, b1, w2, b2, float(eps))
    return y


def conv1x1_bf16x3(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, relu: bool
) -> torch.Tensor:
    """``relu?(conv1x1(x, W) + bias)`` of a channels-last CPU float32 map ``x`` (B, K, H, W), with ``packed =
    pack_weight(W.view(N, K))`` (either layout); channels-last float32 output (B, N, H, W)."""
    return CONV1X1_BF16X3["torch"](x, packed, bias, bool(relu))
