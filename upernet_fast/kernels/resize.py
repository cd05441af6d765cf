"""Bilinear resize, and bilinear resize fused with the channel argmax (logits -> label map).

Replaces ``F.interpolate(x, size, mode="bilinear", align_corners=False)`` (``antialias=False``: 2 taps per
axis whatever the ratio, so downscaling too) and ``F.interpolate(...).argmax(1)``, the last step of
semantic segmentation. The index/weight rule is ATen's (see ``_common``):

    y[b, c, Y, X] = l0h(Y) * (l0w(X) x[b, c, i0(Y), j0(X)] + l1w(X) x[.., i0, j1])
                  + l1h(Y) * (l0w(X) x[b, c, i1(Y), j0(X)] + l1w(X) x[.., i1, j1])

``resize_argmax`` never writes the full (B, C, H, W) logits (150 x 512 x 512 x 4 B = 157 MB for ADE20K at
512x512): it returns ``argmax_c y[b, c, Y, X]`` as int64 (B, H, W). Ties resolve to the first maximal
channel and NaN counts as maximal, as in ``torch.argmax``; each interpolated value is rounded to the input
dtype before comparing, as the unfused reference does.

Triton: one program per (block of output pixels, image) loops over channels keeping the running max and
its index in registers (fp32 math). ``resize_bilinear`` is the elementwise kernel with the same math.

PyTorch path of ``resize_argmax``: output row blocks, so peak extra memory is bounded (``block_bytes``,
default 64 MB; blocks aim at ~16 MB to stay in cache). When the ratio allows (``h / gcd(h, H)`` input rows
map onto ``H / gcd(h, H)`` output rows: every power-of-two upscale, e.g. 128 -> 512), each block is a crop of
the input resized by ``F.interpolate`` itself, in channels-last (ATen's channels-last bilinear kernel is
~3x faster than its NCHW one), with a one-step margin so the crop's own edge clamping never reaches kept
rows; for power-of-two ratios the source indices and weights are then bit-identical to the full resize.
Otherwise (or when even one step exceeds the budget) each block resizes the source rows it reads along the
width only and blends row pairs with ATen's weights. The channels-last crop blocks measured fastest (bench/results/decisions.md, "resize_argmax"). Labels
can differ from the NCHW reference only where two logits tie to within float rounding (1 of 262144
pixels for random logits). The resize itself (``resize_bilinear``) stays ``F.interpolate``: it is the
reference, and the channels-last kernel does not pay for the transposes back to NCHW.
"""

import math

import torch
import torch.nn.functional as F

from . import native
from ._common import (
    bilerp,
    bilinear_indices,
    bilinear_scale,
    bilinear_src,
    check_triton_tensors,
    opmath_dtype,
    out_memory_format,
    plane_block,
    register_ops,
    tl,
    triton,
)
from ._memory import empty_output

__all__ = [
    "resize_bilinear",
    "resize_bilinear_triton",
    "resize_bilinear_torch",
    "resize_argmax",
    "resize_argmax_triton",
    "resize_argmax_torch",
]


@triton.jit
def _resize_bilinear_kernel(
    x_ptr, y_ptr,
    C, h, w, H, W, scale_h, scale_w,
    sx_b, sx_c, sx_h, sx_w,
    sy_b, sy_c, sy_h, sy_w,
    BLOCK: tl.constexpr,
):  # fmt: skip
    b, c, Y, X, mask = plane_block(C, H, W, BLOCK)
    i0, i1, l0h, l1h = bilinear_src(Y, h, scale_h)
    j0, j1, l0w, l1w = bilinear_src(X, w, scale_w)
    v = bilerp(x_ptr + b * sx_b + c * sx_c, i0, i1, j0, j1, l0h, l1h, l0w, l1w, sx_h, sx_w, mask)
    tl.store(y_ptr + b * sy_b + c * sy_c + Y * sy_h + X * sy_w, v.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _resize_argmax_kernel(
    x_ptr, y_ptr,
    C, h, w, H, W, scale_h, scale_w,
    sx_b, sx_c, sx_h, sx_w,
    BLOCK: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < H * W
    Y = offs // W
    X = offs % W
    i0, i1, l0h, l1h = bilinear_src(Y, h, scale_h)
    j0, j1, l0w, l1w = bilinear_src(X, w, scale_w)
    base = x_ptr + b * sx_b
    best = tl.full((BLOCK,), float("-inf"), tl.float32)
    best_idx = tl.zeros((BLOCK,), dtype=tl.int32)
    for c in range(C):
        v = bilerp(base + c * sx_c, i0, i1, j0, j1, l0h, l1h, l0w, l1w, sx_h, sx_w, mask)
        v = v.to(x_ptr.dtype.element_ty).to(tl.float32)  # compare what the reference would have stored
        # Strict '>' keeps the first maximum; a NaN wins over any number (torch.argmax semantics).
        take = (v > best) | ((v != v) & (best == best))
        best = tl.where(take, v, best)
        best_idx = tl.where(take, c, best_idx)
    tl.store(y_ptr + b * H * W + offs, best_idx.to(tl.int64), mask=mask)


def _check(x: torch.Tensor, size) -> tuple[int, int]:
    if x.dim() != 4 or len(size) != 2 or min(size) < 1 or min(x.shape[2:]) < 1:
        raise ValueError(
            f"resize: expected NCHW x and a 2-element positive size, got {tuple(x.shape)}, {size}"
        )
    return int(size[0]), int(size[1])


def resize_bilinear_triton(x: torch.Tensor, size: list[int]) -> torch.Tensor:
    H, W = _check(x, size)
    check_triton_tensors(x)
    B, C, h, w = x.shape
    y = torch.empty((B, C, H, W), device=x.device, dtype=x.dtype, memory_format=out_memory_format(x))
    BLOCK = 256
    grid = (triton.cdiv(H * W, BLOCK), B * C)
    _resize_bilinear_kernel[grid](
        x, y, C, h, w, H, W, bilinear_scale(h, H), bilinear_scale(w, W), *x.stride(), *y.stride(), BLOCK=BLOCK
    )
    return y


def resize_bilinear_torch(x: torch.Tensor, size: list[int]) -> torch.Tensor:
    H, W = _check(x, size)
    fmt = out_memory_format(x)
    if (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and fmt == torch.contiguous_format  # the C kernel writes NCHW
        and native.library() is not None
    ):
        return _resize_bilinear_native(x, H, W)
    y = empty_output((x.shape[0], x.shape[1], H, W), dtype=x.dtype, device=x.device, memory_format=fmt)
    # F.interpolate's kernel writing into a huge-page buffer (same op and scales: size given, no scale).
    return torch.ops.aten.upsample_bilinear2d.out(x, [H, W], False, None, None, out=y)


def _resize_bilinear_native(x: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """The C separable resize (``csrc/resize.c``) into a contiguous NCHW huge-page output, from any input
    strides; sampling positions and weights are ATen's, the summation order differs (about an ulp)."""
    B, C, h, w = x.shape
    y = empty_output((B, C, H, W), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y
    rows = bilinear_indices(h, H, x.dtype, x.device)
    cols = bilinear_indices(w, W, x.dtype, x.device)
    failed = native.library().resize_bilinear_planes(
        x.data_ptr(), B, C, *x.stride(), h, w, y.data_ptr(), H, W,
        *(t.data_ptr() for t in (*rows, *cols)), torch.get_num_threads(),
    )  # fmt: skip
    if failed:
        raise MemoryError(f"resize_bilinear: could not allocate the row buffer ({h}x{W} floats)")
    return y


def resize_argmax_triton(x: torch.Tensor, size: list[int]) -> torch.Tensor:
    H, W = _check(x, size)
    check_triton_tensors(x)
    B, C, h, w = x.shape
    y = torch.empty((B, H, W), device=x.device, dtype=torch.int64)
    BLOCK = 256
    grid = (triton.cdiv(H * W, BLOCK), B)
    _resize_argmax_kernel[grid](
        x, y, C, h, w, H, W, bilinear_scale(h, H), bilinear_scale(w, W), *x.stride(), BLOCK=BLOCK
    )
    return y


def resize_argmax_torch(
    x: torch.Tensor, size: list[int], block_bytes: int = 64 << 20, target_bytes: int = 16 << 20
) -> torch.Tensor:
    H, W = _check(x, size)
    B, C, h, w = x.shape
    op = opmath_dtype(x.dtype)
    y = torch.empty((B, H, W), device=x.device, dtype=torch.int64)
    row_bytes = B * C * W * torch.finfo(op).bits // 8  # one output row of resized logits
    # Row blocks that F.interpolate itself can resize: a crop of `step_in` * n input rows maps onto exactly
    # `step_out` * n output rows with the same scale, so interior rows get the same source indices and
    # weights as the full resize; one step of margin on each side keeps the crop's own edge clamping out.
    g = math.gcd(h, H)
    step_in, step_out = h // g, H // g
    steps = min(block_bytes, target_bytes) // (row_bytes * step_out) - 2
    if steps < 1:
        return _resize_argmax_gather(x, H, W, block_bytes)
    # Channels-last: ATen's channels-last bilinear kernel is ~3x faster than the NCHW one here and the
    # argmax then reduces over the contiguous dim.
    xc = x.to(op).contiguous(memory_format=torch.channels_last)
    for s0 in range(0, g, steps):
        s1 = min(g, s0 + steps)
        a, b = max(0, s0 - 1), min(g, s1 + 1)
        v = F.interpolate(
            xc[:, :, a * step_in : b * step_in],
            size=((b - a) * step_out, W),
            mode="bilinear",
            align_corners=False,
        )
        off = (s0 - a) * step_out
        v = v[:, :, off : off + (s1 - s0) * step_out]
        if v.dtype != x.dtype:
            v = v.to(x.dtype)  # compare what the unfused reference would have stored
        y[:, s0 * step_out : s1 * step_out] = v.argmax(1)
    return y


def _resize_argmax_gather(x: torch.Tensor, H: int, W: int, block_bytes: int) -> torch.Tensor:
    """Any ratio, any block size: per block of output rows, resize the source rows it reads along the width
    (``F.interpolate`` with an unchanged height copies rows exactly), then blend row pairs with ATen's
    weights in ATen's order."""
    B, C, h, w = x.shape
    op = opmath_dtype(x.dtype)
    i0, i1, l0, l1 = bilinear_indices(h, H, x.dtype, x.device)
    y = torch.empty((B, H, W), device=x.device, dtype=torch.int64)
    # ~4 live (B, C, rows, W) op-math buffers per block: width-resized input rows, two gathers, blend.
    rows = max(1, min(H, block_bytes // (4 * B * C * W * torch.finfo(op).bits // 8)))
    for y0 in range(0, H, rows):
        y1 = min(H, y0 + rows)
        lo, hi = int(i0[y0]), int(i1[y1 - 1]) + 1  # indices are monotonic: a contiguous source row range
        src = F.interpolate(x[:, :, lo:hi].to(op), size=(hi - lo, W), mode="bilinear", align_corners=False)
        top = src.index_select(2, i0[y0:y1] - lo).mul_(l0[y0:y1, None])
        v = top.addcmul_(src.index_select(2, i1[y0:y1] - lo), l1[y0:y1, None])
        if v.dtype != x.dtype:
            v = v.to(x.dtype)
        y[:, y0:y1] = v.argmax(1)
    return y


def _resize_bilinear_fake(x, size):
    H, W = _check(x, size)
    return torch.empty(
        (x.shape[0], x.shape[1], H, W), device=x.device, dtype=x.dtype, memory_format=out_memory_format(x)
    )


def _resize_argmax_fake(x, size):
    H, W = _check(x, size)
    return x.new_empty((x.shape[0], H, W), dtype=torch.int64)


RESIZE_BILINEAR = register_ops(
    "resize_bilinear",
    {"torch": resize_bilinear_torch, "triton": resize_bilinear_triton},
    _resize_bilinear_fake,
)


def _resize_argmax_torch_op(x: torch.Tensor, size: list[int]) -> torch.Tensor:
    return resize_argmax_torch(x, size)  # default block budgets


RESIZE_ARGMAX = register_ops(
    "resize_argmax", {"torch": _resize_argmax_torch_op, "triton": resize_argmax_triton}, _resize_argmax_fake
)


def resize_bilinear(
    x: torch.Tensor, size: list[int] | tuple[int, int], *, backend: str = "torch"
) -> torch.Tensor:
    """``F.interpolate(x, size, mode="bilinear", align_corners=False)`` (any ratio, up or down)."""
    return RESIZE_BILINEAR[backend](x, [int(s) for s in size])


def resize_argmax(
    x: torch.Tensor, size: list[int] | tuple[int, int], *, backend: str = "torch"
) -> torch.Tensor:
    """``resize_bilinear(x, size).argmax(1)`` (int64, (B, H, W)) without materialising the resized logits."""
    return RESIZE_ARGMAX[backend](x, [int(s) for s in size])
