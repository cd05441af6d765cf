"""The ConvNeXt block MLP in float32 as split-bfloat16 GEMMs on AMX, with a float32 result (CPU).

``y <- x + b2 + gelu(layernorm(y) @ W1 + b1) @ W2`` over the rows of channels-last maps, where the GEMMs
run as "bf16x3" (see ``bf16x3.py`` for the split): each GEMM input ``a`` becomes ``[hi | lo | hi]`` per
row and each weight ``[W_hi; W_hi; W_lo]``, so ONE bfloat16 GEMM over 3K sums ``hi W_hi + lo W_hi +
hi W_lo`` in float32 and writes float32. That GEMM is MKL's ``cblas_gemm_bf16bf16f32``, which PyTorch's
own libtorch_cpu exports (AMX kernels inside) but no PyTorch op exposes; here it is called from C
(``csrc/mlp_bf16x3.c``), which also does the LayerNorm + split and bias + GELU + split passes in row
chunks that stay in cache.

Why: on a Xeon with AMX-BF16 that GEMM runs at 600-1100 GMAC/s against MKL float32's 130-180, so the
three-term product still beats float32 1.5-2.2x; the block MLPs (ConvNeXt-T: 22 of its 23 GMACs) are the
float32 path's largest cost after the head's Winograd GEMMs (bench/results/decisions.md, "ConvNeXt MLP
as bf16x3"). Error: ~4e-6 of the block output's scale (float32: ~6e-7); ConvNeXt-T logits are as close to
transformers as before (the head's Winograd error dominates). Not for Winograd's GEMMs: the inverse
transform amplifies the split's error to 1.5-2e-4 (decisions.md).

Whether it runs is decided in ``upernet_fast.dispatch.mlp_bf16x3_choice``.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch

from . import native
from ._memory import empty_output

__all__ = ["gemm_bf16bf16f32", "mlp_bf16x3_", "mlp_bf16x3_blocker", "pack_weight"]

# Rows per chunk. Fewer re-read the weights too often (each chunk streams both from memory), more spill
# the chunk's hidden activations out of cache: on a Xeon with AMX-BF16, 512 was best or within 5% of it
# at each ConvNeXt-T stage (128-2048 rows and whole maps measured; bench/results/decisions.md).
CHUNK_ROWS = 512


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


def mlp_bf16x3_blocker(x: torch.Tensor) -> str | None:
    """Why ``mlp_bf16x3_`` cannot run on ``x`` here, or None when it can. Only whether it is possible: AMX
    (without it bf16x3 is slower than float32) and the rest are the caller's to check."""
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return "bf16x3 MLP is for CPU float32"
    if native.library() is None:
        return "the native C helpers are unavailable"
    if gemm_bf16bf16f32() is None:
        return "this PyTorch build exports no MKL cblas_gemm_bf16bf16f32"
    return None


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """(N, K) Linear weight -> the (3K, N) row-major bfloat16 GEMM operand ``[W_hi; W_hi; W_lo]`` (Wᵀ split)."""
    w = weight.detach().float().t()
    hi = w.to(torch.bfloat16)
    lo = (w - hi.float()).to(torch.bfloat16)
    return torch.cat([hi, hi, lo], 0).contiguous()


def _rows(t: torch.Tensor, name: str, c: int) -> None:
    if t.dim() != 4 or t.shape[1] != c or not t.is_contiguous(memory_format=torch.channels_last):
        raise ValueError(
            f"mlp_bf16x3_: {name} must be a channels-last (B, {c}, H, W) map, got {tuple(t.shape)}"
        )


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
    blocker = mlp_bf16x3_blocker(y)
    if blocker is not None:
        raise ValueError(f"mlp_bf16x3_: {blocker}")
    c = y.shape[1]
    _rows(y, "y", c)
    _rows(x, "x", c)
    if x.shape != y.shape or x.dtype != y.dtype:
        raise ValueError(f"mlp_bf16x3_: x {x.dtype} {tuple(x.shape)} must match y {y.dtype} {tuple(y.shape)}")
    n = w1.shape[1]
    if (
        w1.dtype != torch.bfloat16
        or w2.dtype != torch.bfloat16
        or tuple(w1.shape) != (3 * c, n)
        or tuple(w2.shape) != (3 * n, c)
        or not (w1.is_contiguous() and w2.is_contiguous())
        or tuple(b1.shape) != (n,)
        or tuple(b2.shape) != (c,)
    ):
        raise ValueError(
            f"mlp_bf16x3_: weights must be pack_weight() of ({n}, {c}) and ({c}, {n}) Linear weights with "
            f"biases ({n},), ({c},); got {tuple(w1.shape)} {w1.dtype}, {tuple(w2.shape)} {w2.dtype}, "
            f"{tuple(b1.shape)}, {tuple(b2.shape)}"
        )
    rows = y.numel() // c
    threads = torch.get_num_threads()
    chunk = max(1, min(rows, CHUNK_ROWS))
    a1 = empty_output((chunk * 3 * c,), dtype=torch.bfloat16, device=y.device)
    hidden = empty_output((chunk * n,), dtype=torch.float32, device=y.device)
    a2 = empty_output((chunk * 3 * n,), dtype=torch.bfloat16, device=y.device)
    tmp = empty_output((threads * max(n, c),), dtype=torch.float32, device=y.device)
    b1, b2 = b1.float().contiguous(), b2.float().contiguous()
    native.library().bf16x3_convnext_mlp(
        y.data_ptr(), x.data_ptr(), rows, c, n, eps, w1.data_ptr(), b1.data_ptr(), w2.data_ptr(),
        b2.data_ptr(), chunk, a1.data_ptr(), hidden.data_ptr(), a2.data_ptr(), tmp.data_ptr(),
        gemm_bf16bf16f32(), threads,
    )  # fmt: skip
    return y
