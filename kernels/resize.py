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
default 64 MB) and the working set stays in cache: per block, the needed input rows are resized along
the width only (``F.interpolate`` with an unchanged height is an exact copy of rows, so this is ATen's own
width pass), then the two source rows per output row are blended with ATen's weights in ATen's order and
reduced with ``argmax``. The resize itself (``resize_bilinear``) stays ``F.interpolate``: it is the reference.
"""

import torch
import torch.nn.functional as F

from ._common import (
    bilerp,
    bilinear_indices,
    bilinear_scale,
    bilinear_src,
    check_triton_tensors,
    opmath_dtype,
    out_memory_format,
    tl,
    triton,
)

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
    pid = tl.program_id(0)
    bc = tl.program_id(1)
    b = (bc // C).to(tl.int64)
    c = bc % C
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < H * W
    Y = offs // W
    X = offs % W
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
    y = F.interpolate(x, size=(H, W), mode="bilinear", align_corners=False)
    return y.contiguous(memory_format=out_memory_format(x))


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


def resize_argmax_torch(x: torch.Tensor, size: list[int], block_bytes: int = 64 << 20) -> torch.Tensor:
    H, W = _check(x, size)
    B, C, h, w = x.shape
    op = opmath_dtype(x.dtype)
    i0, i1, l0, l1 = bilinear_indices(h, H, x.dtype, x.device)
    y = torch.empty((B, H, W), device=x.device, dtype=torch.int64)
    # ~4 live (B, C, rows, W) op-math buffers per block: width-resized input rows, two gathers, blend.
    rows = max(1, min(H, block_bytes // (4 * B * C * W * torch.finfo(op).bits // 8)))
    for y0 in range(0, H, rows):
        y1 = min(H, y0 + rows)
        lo, hi = int(i0[y0]), int(i1[y1 - 1]) + 1  # indices are monotonic: a contiguous source row range
        src = x[:, :, lo:hi].to(op)
        src = F.interpolate(src, size=(hi - lo, W), mode="bilinear", align_corners=False)  # width only
        top = src.index_select(2, i0[y0:y1] - lo).mul_(l0[y0:y1, None])
        v = top.addcmul_(src.index_select(2, i1[y0:y1] - lo), l1[y0:y1, None])
        if v.dtype != x.dtype:
            v = v.to(x.dtype)
        y[:, y0:y1] = v.argmax(1)
    return y


@torch.library.custom_op("upernet_fast::resize_bilinear", mutates_args=())
def _resize_bilinear_op(x: torch.Tensor, size: list[int], backend: str) -> torch.Tensor:
    impl = resize_bilinear_triton if backend == "triton" else resize_bilinear_torch
    return impl(x, size)


@_resize_bilinear_op.register_fake
def _(x, size, backend):
    H, W = _check(x, size)
    return torch.empty(
        (x.shape[0], x.shape[1], H, W), device=x.device, dtype=x.dtype, memory_format=out_memory_format(x)
    )


@torch.library.custom_op("upernet_fast::resize_argmax", mutates_args=())
def _resize_argmax_op(x: torch.Tensor, size: list[int], backend: str) -> torch.Tensor:
    impl = resize_argmax_triton if backend == "triton" else resize_argmax_torch
    return impl(x, size)


@_resize_argmax_op.register_fake
def _(x, size, backend):
    H, W = _check(x, size)
    return x.new_empty((x.shape[0], H, W), dtype=torch.int64)


def resize_bilinear(
    x: torch.Tensor, size: list[int] | tuple[int, int], *, backend: str = "torch"
) -> torch.Tensor:
    """``F.interpolate(x, size, mode="bilinear", align_corners=False)`` (any ratio, up or down)."""
    return torch.ops.upernet_fast.resize_bilinear(x, [int(s) for s in size], backend)


def resize_argmax(
    x: torch.Tensor, size: list[int] | tuple[int, int], *, backend: str = "torch"
) -> torch.Tensor:
    """``resize_bilinear(x, size).argmax(1)`` (int64, (B, H, W)) without materialising the resized logits."""
    return torch.ops.upernet_fast.resize_argmax(x, [int(s) for s in size], backend)
