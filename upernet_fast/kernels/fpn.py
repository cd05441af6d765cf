"""The FPN part of the decode head: top-down add, and the low-resolution evaluation of
``conv3x3(upsample(x))`` used for ``fpn_bottleneck`` (and the PPM ``bottleneck``).

(a) ``topdown_add(hi, lo) = hi + F.interpolate(lo, size=hi.shape[2:], mode="bilinear", align_corners=False)``
    (UPerNet's ``laterals[i - 1] += up(laterals[i])``), in one pass in Triton.

(b) ``upsample_shift_add(taps, size, out)``. Let ``U`` be the bilinear resize (align_corners=False) of an
    (h, w) map to (H, W) and ``conv`` a 3x3 convolution with padding 1 whose tap (ky, kx) has channel matrix
    ``W_t``. ``U`` acts per channel and commutes with channel mixing, and a 3x3 conv is a sum of shifted
    1x1 convs, so (exactly, up to float rounding)

        conv(U(x))[o, Y, X] = sum_t U(W_t x)[o, Y + dy, X + dx],   t = (dy + 1) * 3 + (dx + 1) = ky * 3 + kx,

    where a term is 0 when (Y + dy, X + dx) lies outside [0, H) x [0, W): the conv's zero padding is at the
    HIGH resolution, while ``U`` clamps its source indices at the LOW resolution edge. ``taps[:, t] = W_t x``
    (B, 9, C, h, w) come from one 1x1 conv with ``conv3x3_taps_weight(weight)`` at low resolution (9*C*Cin
    MACs per low-res pixel instead of 9*C*Cin per high-res one), and this op forms the sum at high
    resolution, added into ``out`` if given (several pyramid levels accumulate into one buffer; the
    concatenation of the levels is never built).

    ``U`` is separable, ``U(z) = A_h z A_w^T`` with (H, h) / (W, w) matrices of 2 non-zeros per row, and a
    shift by d is the same matrix with rows moved by d (rows leaving [0, H) are zero). So with
    ``A_h^(dy)``, ``A_w^(dx)`` the shifted matrices

        out = sum_dy A_h^(dy) R_dy,      R_dy = sum_dx taps[dy, dx] A_w^(dx)T      (width pass at low rows)

    Triton: one program per (block of output pixels, (b, c) plane) evaluates the 9 bilinear taps straight
    from ``taps`` (36 gathers, fp32 accumulation) and writes each output element once.

    PyTorch (CPU) path. Nothing full-size but ``out`` is ever written, and each output row is written once
    per call; work goes in output row blocks (8 rows at C=512) whose intermediates stay in cache:
      * channels-last taps (physical (B, h, w, 9, C), what a 1x1 conv on channels-last input returns; the
        fast path): the width pass for the low-res rows a block reads is ONE ``F.embedding_bag`` (sum mode,
        per-sample weights) over the table of C-vectors taps[b, i, j, t, :]: bag (i, dy, X) = the 6 weighted
        rows (dx, k) of ``R_dy[i, X]``. The height pass for all three dy is ONE GEMM of the block's dense band
        of [A_h^(-1) | A_h^(0) | A_h^(1)] (columns ordered (i, dy); zeros inside the band are exact) with R
        seen as (3 * rows, W * C), accumulated straight into ``out[b]`` seen as (H, W * C).
      * NCHW taps: the same in transpose: height pass first as one ``embedding_bag`` over w-vector rows
        (bag (c, Y, dx) = 6 weighted rows (dy, k)), then the width pass as banded GEMMs into ``out`` seen as
        (C * H, W), per chunk of channels.
      * float32/bfloat16 channels-last taps into a float32 channels-last ``out``, with the C helpers (the
        embedding_bag path above is then the fallback without them): ``csrc/usa.c``,
        the same separable sum per tile of output rows and columns (width pass per low-res row, kept in a
        per-thread cache, then 6 weighted rows per output pixel), reading the bf16 taps directly. The same
        kernel sums a bottleneck's direct conv and all its groups in one pass (``upsample_shift_add_sum``).
    ``out`` of another layout or dtype gets one extra add. Float16 is computed in float32.

    Why this algorithm and not the simpler ones (9 full-size resizes and shifted adds; separable
    F.interpolate; batched banded GEMMs): measured in bench/results/decisions.md ("upsample_shift_add").
"""

from functools import lru_cache

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
    "topdown_add",
    "topdown_add_triton",
    "topdown_add_torch",
    "upsample_shift_add",
    "upsample_shift_add_triton",
    "upsample_shift_add_torch",
    "upsample_shift_add_sum",
    "upsample_shift_add_sum_triton",
    "upsample_shift_add_sum_torch",
    "conv3x3_taps_weight",
]


# ----------------------------------------------------------------------------------------- Triton kernels
@triton.jit
def _topdown_add_kernel(
    hi_ptr, lo_ptr, y_ptr,
    C, h, w, H, W, scale_h, scale_w,
    sh_b, sh_c, sh_h, sh_w,
    sl_b, sl_c, sl_h, sl_w,
    sy_b, sy_c, sy_h, sy_w,
    BLOCK: tl.constexpr,
):  # fmt: skip
    b, c, Y, X, mask = plane_block(C, H, W, BLOCK)
    i0, i1, l0h, l1h = bilinear_src(Y, h, scale_h)
    j0, j1, l0w, l1w = bilinear_src(X, w, scale_w)
    v = bilerp(lo_ptr + b * sl_b + c * sl_c, i0, i1, j0, j1, l0h, l1h, l0w, l1w, sl_h, sl_w, mask)
    v += tl.load(hi_ptr + b * sh_b + c * sh_c + Y * sh_h + X * sh_w, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + b * sy_b + c * sy_c + Y * sy_h + X * sy_w, v.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _upsample_shift_add_kernel(
    t_ptr, y_ptr,
    C, h, w, H, W, scale_h, scale_w,
    st_b, st_t, st_c, st_h, st_w,
    sy_b, sy_c, sy_h, sy_w,
    ACCUMULATE: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    b, c, Y, X, mask = plane_block(C, H, W, BLOCK)
    base = t_ptr + b * st_b + c * st_c
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for ty in tl.static_range(3):
        Yt = Y + (ty - 1)
        row_ok = (Yt >= 0) & (Yt < H)  # the conv's zero padding, at high resolution
        i0, i1, l0h, l1h = bilinear_src(tl.minimum(tl.maximum(Yt, 0), H - 1), h, scale_h)
        for tx in tl.static_range(3):
            Xt = X + (tx - 1)
            ok = mask & row_ok & (Xt >= 0) & (Xt < W)
            j0, j1, l0w, l1w = bilinear_src(tl.minimum(tl.maximum(Xt, 0), W - 1), w, scale_w)
            # Masked-off loads read 0, so out-of-image taps contribute exactly 0.
            acc += bilerp(base + (ty * 3 + tx) * st_t, i0, i1, j0, j1, l0h, l1h, l0w, l1w, st_h, st_w, ok)
    y = y_ptr + b * sy_b + c * sy_c + Y * sy_h + X * sy_w
    if ACCUMULATE:
        acc += tl.load(y, mask=mask, other=0.0).to(tl.float32)
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------- topdown_add
def _check_topdown(hi: torch.Tensor, lo: torch.Tensor) -> None:
    if hi.dim() != 4 or lo.dim() != 4 or hi.shape[:2] != lo.shape[:2]:
        raise ValueError(f"topdown_add: expected NCHW hi/lo with equal (B, C), got {hi.shape}, {lo.shape}")


def topdown_add_triton(hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    _check_topdown(hi, lo)
    check_triton_tensors(hi, lo)
    B, C, H, W = hi.shape
    h, w = lo.shape[2:]
    y = torch.empty_like(hi, memory_format=out_memory_format(hi))
    BLOCK = 256
    grid = (triton.cdiv(H * W, BLOCK), B * C)
    _topdown_add_kernel[grid](
        hi, lo.to(hi.dtype), y, C, h, w, H, W, bilinear_scale(h, H), bilinear_scale(w, W),
        *hi.stride(), *lo.stride(), *y.stride(), BLOCK=BLOCK,
    )  # fmt: skip
    return y


def _topdown_native_possible(hi: torch.Tensor, lo: torch.Tensor) -> bool:
    """Where the C top-down add runs: bfloat16 channels-last CPU maps (PyTorch's resize and add each take a
    pass and a rounding there), C helpers built. Float32 keeps ATen's bitwise result."""
    return (
        hi.device.type == "cpu"
        and hi.dtype == lo.dtype == torch.bfloat16
        and out_memory_format(hi) == torch.channels_last
        and hi.stride(1) == 1
        and lo.stride(1) == 1
        and native.library() is not None
    )


def _topdown_add_native(hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    B, C, H, W = hi.shape
    h, w = lo.shape[2:]
    y = empty_output(hi.shape, dtype=hi.dtype, device=hi.device, memory_format=torch.channels_last)
    tables = (*bilinear_indices(h, H, torch.float32, "cpu"), *bilinear_indices(w, W, torch.float32, "cpu"))
    i0, i1, l0h, l1h, j0, j1, l0w, l1w = tables
    native.library().topdown_add_nhwc_bf16(
        hi.data_ptr(), hi.stride(0), hi.stride(2), hi.stride(3), lo.data_ptr(), lo.stride(0), lo.stride(2),
        lo.stride(3), y.data_ptr(), y.stride(0), y.stride(2), y.stride(3), B, C, H, W,
        *(t.data_ptr() for t in (i0, i1, l0h, l1h, j0, j1, l0w, l1w)), torch.get_num_threads(),
    )  # fmt: skip
    return y


def topdown_add_torch(hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    _check_topdown(hi, lo)
    if _topdown_native_possible(hi, lo):
        return _topdown_add_native(hi, lo)
    fmt = out_memory_format(hi)
    up = empty_output(hi.shape, dtype=hi.dtype, device=hi.device, memory_format=fmt)
    # F.interpolate's kernel into a huge-page buffer, then add_ there: no third full-size buffer.
    torch.ops.aten.upsample_bilinear2d.out(lo.to(hi.dtype), list(hi.shape[2:]), False, None, None, out=up)
    return up.add_(hi)


def _topdown_add_fake(hi, lo):
    _check_topdown(hi, lo)
    return torch.empty_like(hi, memory_format=out_memory_format(hi))


TOPDOWN_ADD = register_ops(
    "topdown_add", {"torch": topdown_add_torch, "triton": topdown_add_triton}, _topdown_add_fake
)


def topdown_add(hi: torch.Tensor, lo: torch.Tensor, *, backend: str = "torch") -> torch.Tensor:
    """``hi + F.interpolate(lo, size=hi.shape[2:], mode="bilinear", align_corners=False)``."""
    return TOPDOWN_ADD[backend](hi, lo)


# ------------------------------------------------------------------------------------ upsample_shift_add
def conv3x3_taps_weight(weight: torch.Tensor) -> torch.Tensor:
    """(Cout, Cin, 3, 3) -> (9*Cout, Cin, 1, 1): a 1x1 conv with it yields ``taps`` as (B, 9*Cout, h, w),
    i.e. (B, 9, Cout, h, w) with tap index t = ky * 3 + kx."""
    c_out, c_in, kh, kw = weight.shape
    if (kh, kw) != (3, 3):
        raise ValueError(f"conv3x3_taps_weight: expected a 3x3 kernel, got {tuple(weight.shape)}")
    return weight.permute(2, 3, 0, 1).reshape(9 * c_out, c_in, 1, 1).contiguous()


def _as_taps(taps: torch.Tensor) -> torch.Tensor:
    """Accept (B, 9*C, h, w) (the 1x1 conv's output) as well as (B, 9, C, h, w); a view either way."""
    if taps.dim() == 4 and taps.shape[1] % 9 == 0:
        return taps.unflatten(1, (9, taps.shape[1] // 9))
    return taps


def _check_usa(taps: torch.Tensor, size, out: torch.Tensor | None) -> tuple[int, int]:
    if taps.dim() != 5 or taps.shape[1] != 9 or len(size) != 2:
        raise ValueError(
            f"upsample_shift_add: expected taps (B, 9, C, h, w) and size (H, W), got {taps.shape}"
        )
    H, W = int(size[0]), int(size[1])
    B, _, C = taps.shape[:3]
    if min(taps.shape[3:]) < 1 or min(H, W) < 1:  # an empty map has no pixels to resize from or to
        raise ValueError(
            f"upsample_shift_add: taps of {tuple(taps.shape[3:])} px to size {(H, W)}: both need at least 1 px"
        )
    if out is not None and tuple(out.shape) != (B, C, H, W):
        raise ValueError(f"upsample_shift_add: out has shape {tuple(out.shape)}, expected {(B, C, H, W)}")
    return H, W


def upsample_shift_add_triton(
    taps: torch.Tensor, size: list[int], out: torch.Tensor | None = None
) -> torch.Tensor:
    taps = _as_taps(taps)
    H, W = _check_usa(taps, size, out)
    check_triton_tensors(taps)
    B, _, C, h, w = taps.shape
    accumulate = out is not None
    if out is None:
        out = torch.empty(
            (B, C, H, W), device=taps.device, dtype=taps.dtype, memory_format=_usa_out_format(taps)
        )
    else:
        check_triton_tensors(out)
    BLOCK = 256
    grid = (triton.cdiv(H * W, BLOCK), B * C)
    _upsample_shift_add_kernel[grid](
        taps, out, C, h, w, H, W, bilinear_scale(h, H), bilinear_scale(w, W),
        *taps.stride(), *out.stride(), ACCUMULATE=accumulate, BLOCK=BLOCK,
    )  # fmt: skip
    return out


@lru_cache(maxsize=64)
def _width_bags(h: int, w: int, W: int, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Width pass as weighted bags: bag (i, dy, X) sums the 6 rows (dx, k) of a (h, w, 9) table of
    C-vectors, row ``(i * w + j_k(X + dx)) * 9 + 3 * dy + dx``, weight ``l_k(X + dx)`` (0 off the image)."""
    idx = torch.empty(h, 3, W, 3, 2, dtype=torch.int64)
    wt = torch.empty(h, 3, W, 3, 2, dtype=opmath_dtype(dtype))
    rows = torch.arange(h)[:, None]
    for dx in range(3):
        j0, j1, l0, l1 = bilinear_indices(w, W, dtype, "cpu", dx - 1)
        for dy in range(3):
            idx[:, dy, :, dx, 0] = (rows * w + j0) * 9 + 3 * dy + dx
            idx[:, dy, :, dx, 1] = (rows * w + j1) * 9 + 3 * dy + dx
            wt[:, dy, :, dx, 0] = l0
            wt[:, dy, :, dx, 1] = l1
    return idx.view(h, 3 * W, 6).to(device), wt.view(h, 3 * W, 6).to(device)


@lru_cache(maxsize=64)
def _height_bands(
    h: int, H: int, block: int, dtype: torch.dtype, device: str
) -> tuple[tuple[int, int, int, int, torch.Tensor], ...]:
    """Row blocks (a, b) of the output with the contiguous low-res row range (lo, hi) they read and the
    dense band (b - a, 3 * (hi - lo)) of the three shifted height matrices, columns ordered (row, dy)."""
    M = torch.zeros(H, h, 3, dtype=torch.float64)
    rows = torch.arange(H)
    for dy in range(3):
        i0, i1, l0, l1 = bilinear_indices(h, H, torch.float64, "cpu", dy - 1)
        M[rows, i0, dy] += l0
        M[rows, i1, dy] += l1
    bands = []
    for a in range(0, H, block):
        b = min(H, a + block)
        used = M[a:b].abs().sum((0, 2)).nonzero()
        lo, hi = (int(used[0]), int(used[-1]) + 1) if len(used) else (0, 1)
        band = M[a:b, lo:hi].reshape(b - a, 3 * (hi - lo)).to(opmath_dtype(dtype)).contiguous().to(device)
        bands.append((a, b, lo, hi, band))
    return tuple(bands)


def _row_block(h: int, H: int, W: int, C: int, itemsize: int) -> int:
    """Output rows per block: 8 (best measured at C=512), more while the block's R stays under ~3 MB."""
    block = 8
    while block < H and 3 * (2 * block * h // H + 3) * W * C * itemsize <= 3 << 20:
        block *= 2
    return min(block, H)


def _usa_channels_last(taps: torch.Tensor, out: torch.Tensor, accumulate: bool) -> None:
    """Channels-last algorithm; ``out`` is channels-last in the op-math dtype. Per block of output rows:
    width pass of the low-res rows it reads as one ``embedding_bag`` (R[(i, dy), X, :] = 6 weighted C-vector
    rows of the taps), then the height pass for all three dy as one GEMM into ``out`` (each row written once)."""
    B, _, C, h, w = taps.shape
    H, W = out.shape[2:]
    op, dev = out.dtype, str(taps.device)
    idx, wt = _width_bags(h, w, W, taps.dtype, dev)
    bands = _height_bands(h, H, _row_block(h, H, W, C, op.itemsize), taps.dtype, dev)
    widened = None
    if taps.dtype != op:  # widened into one reused buffer: a fresh tensor per block page-faults each time
        rows = max(hi - lo for _, _, lo, hi, _ in bands)
        widened = empty_output((rows * w * 9, C), dtype=op, device=taps.device)
    for b_ in range(B):
        z = taps[b_].permute(2, 3, 0, 1)  # (h, w, 9, C): a view of channels-last taps
        o = out[b_].permute(1, 2, 0)  # (H, W, C): contiguous
        for a, b, lo, hi, band in bands:
            table = z[lo:hi].reshape(-1, C)
            if widened is not None:
                table = widened[: table.shape[0]].copy_(table)
            R = F.embedding_bag(
                idx[lo:hi].reshape(-1, 6) - lo * w * 9,
                table,
                mode="sum",
                per_sample_weights=wt[lo:hi].reshape(-1, 6),
            )
            o[a:b].view(b - a, W * C).addmm_(band, R.view(3 * (hi - lo), W * C), beta=1 if accumulate else 0)


@lru_cache(maxsize=64)
def _height_bags(
    C: int, h: int, H: int, dtype: torch.dtype, device: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Height pass as weighted bags over a (9, C, h) table of w-vectors: bag (c, Y, dx) sums rows
    ``((3 * dy + dx) * C + c) * h + i_k(Y + dy)`` for the 6 (dy, k), weight ``l_k(Y + dy)``."""
    idx = torch.empty(C, H, 3, 3, 2, dtype=torch.int64)
    wt = torch.empty(C, H, 3, 3, 2, dtype=opmath_dtype(dtype))
    c = torch.arange(C)[:, None]
    for dy in range(3):
        i0, i1, l0, l1 = bilinear_indices(h, H, dtype, "cpu", dy - 1)
        for dx in range(3):
            idx[:, :, dx, dy, 0] = ((3 * dy + dx) * C + c) * h + i0
            idx[:, :, dx, dy, 1] = ((3 * dy + dx) * C + c) * h + i1
            wt[:, :, dx, dy, 0] = l0
            wt[:, :, dx, dy, 1] = l1
    return idx.view(C * H * 3, 6).to(device), wt.view(C * H * 3, 6).to(device)


@lru_cache(maxsize=64)
def _width_bands(w: int, W: int, block: int, dtype: torch.dtype, device: str) -> tuple:
    """Column blocks (a, b) with, per dx, the contiguous range (dx*w + lo, dx*w + hi) of a (.., 3w) row
    they read and the transposed dense band (hi - lo, b - a) of the shifted width matrix."""
    mats = []
    for dx in range(3):
        j0, j1, l0, l1 = bilinear_indices(w, W, torch.float64, "cpu", dx - 1)
        M = torch.zeros(W, w, dtype=torch.float64)
        M[torch.arange(W), j0] += l0
        M[torch.arange(W), j1] += l1
        mats.append(M)
    blocks = []
    for a in range(0, W, block):
        b = min(W, a + block)
        parts = []
        for dx, M in enumerate(mats):
            used = M[a:b].abs().sum(0).nonzero()
            lo, hi = (int(used[0]), int(used[-1]) + 1) if len(used) else (0, 1)
            band = M[a:b, lo:hi].t().to(opmath_dtype(dtype)).contiguous().to(device)
            parts.append((dx * w + lo, dx * w + hi, band))
        blocks.append((a, b, tuple(parts)))
    return tuple(blocks)


def _usa_nchw(taps: torch.Tensor, out: torch.Tensor, accumulate: bool) -> None:
    """NCHW algorithm (contiguous rows are along the width here); ``out`` is NCHW in the op-math dtype.
    Per chunk of channels: height pass first as one ``embedding_bag`` over w-vector rows (T[(c, Y), (dx, j)]),
    then the width pass as banded GEMMs straight into ``out`` viewed as (C * H, W)."""
    B, _, C, h, w = taps.shape
    H, W = out.shape[2:]
    op, dev = out.dtype, str(taps.device)
    chunk = max(1, min(C, (3 << 19) // (H * 3 * w * op.itemsize)))  # T chunk ~1.5 MB
    for b_ in range(B):
        for c0 in range(0, C, chunk):
            c1 = min(C, c0 + chunk)
            idx, wt = _height_bags(c1 - c0, h, H, taps.dtype, dev)
            table = taps[b_, :, c0:c1].reshape(9 * (c1 - c0) * h, w).to(op)
            T = F.embedding_bag(idx, table, mode="sum", per_sample_weights=wt).view((c1 - c0) * H, 3 * w)
            o = out[b_, c0:c1].view((c1 - c0) * H, W)
            for a, b, parts in _width_bands(w, W, 32, taps.dtype, dev):
                for k, (lo, hi, band) in enumerate(parts):
                    o[:, a:b].addmm_(T[:, lo:hi], band, beta=1 if accumulate or k else 0)


@lru_cache(maxsize=64)
def _shifted_indices(n_in: int, n_out: int) -> tuple[torch.Tensor, ...]:
    """(i0, i1, l0, l1) of the shifts -1, 0, 1 as (3, n_out) CPU tables (row k: shift k - 1), for the C kernel."""
    parts = [bilinear_indices(n_in, n_out, torch.float32, "cpu", k - 1) for k in range(3)]
    return tuple(torch.stack([part[n] for part in parts]).contiguous() for n in range(4))


def _usa_native_possible(taps: torch.Tensor, out: torch.Tensor) -> bool:
    """Where ``csrc/usa.c`` runs: channels-last float32 or bfloat16 CPU taps (the PyTorch path widens bf16
    taps first), a channels-last float32 ``out``, C helpers built. Xeon, 512 channels into 128x128, float32
    taps: 13.0 -> 7.5 ms from 64x64, 5.6 -> 2.9 ms from 32x32 (bench/results/decisions.md)."""
    return (
        taps.device.type == "cpu"
        and taps.dtype in (torch.float32, torch.bfloat16)
        and out.dtype == torch.float32
        and out.is_contiguous(memory_format=torch.channels_last)
        and native.library() is not None
    )


def _usa_native(taps: torch.Tensor, out: torch.Tensor, accumulate: bool) -> None:
    """One group into ``out``: the one-pass sum of ``csrc/usa.c`` with ``out`` as its own base."""
    _usa_sum_c(out, out if accumulate else None, [taps], relu=False)


def _usa_sum_c(out: torch.Tensor, base: torch.Tensor | None, taps: list[torch.Tensor], relu: bool) -> None:
    """``out = relu?(base + sum of the groups' shift-adds)`` by ``usa_sum_nhwc``: ``out`` channels-last
    float32, ``base`` None (zero) or channels-last float32/bfloat16 with unit channel stride (may be ``out``),
    taps (B, 9, C, h, w) channels-last float32/bfloat16."""
    B, C, H, W = out.shape
    rows, keep = [], []
    for t in taps:
        flat = t.flatten(1, 2)  # (B, 9C, h, w), channels-last: physical (B, h, w, 9, C)
        h, w = t.shape[3:]
        tables = (*_shifted_indices(h, H), *_shifted_indices(w, W))
        keep.append(flat)
        rows.append(
            [flat.data_ptr(), int(flat.dtype == torch.bfloat16), flat.stride(0), flat.stride(2), flat.stride(3),
             h, w, *(x.data_ptr() for x in tables)]
        )  # fmt: skip
    groups = torch.tensor(rows, dtype=torch.int64)
    lib, threads = native.library(), torch.get_num_threads()
    # from the buffer cache: a fresh workspace per call would page-fault every time
    size = threads * lib.usa_sum_workspace(len(taps), C)
    workspace = empty_output((size,), dtype=torch.float32, device=out.device)
    kind, strides = 0, (0, 0, 0)
    if base is not None:
        kind, strides = (
            (2 if base.dtype == torch.bfloat16 else 1),
            (base.stride(0), base.stride(2), base.stride(3)),
        )
    lib.usa_sum_nhwc(
        out.data_ptr(), out.stride(0), out.stride(2), out.stride(3), B, H, W, C,
        None if base is None else base.data_ptr(), kind, *strides,
        len(taps), groups.data_ptr(), int(relu), workspace.data_ptr(), threads,
    )  # fmt: skip


def _usa_out_format(taps: torch.Tensor) -> torch.memory_format:
    """Channels-last output for channels-last taps (physical (B, h, w, 9, C)), NCHW otherwise."""
    return torch.channels_last if taps.permute(0, 3, 4, 1, 2).is_contiguous() else torch.contiguous_format


def upsample_shift_add_torch(
    taps: torch.Tensor, size: list[int], out: torch.Tensor | None = None
) -> torch.Tensor:
    taps = _as_taps(taps)
    H, W = _check_usa(taps, size, out)
    B, _, C, h, w = taps.shape
    op = opmath_dtype(taps.dtype)
    fmt = _usa_out_format(taps)
    run = _usa_channels_last if fmt == torch.channels_last else _usa_nchw
    if fmt == torch.channels_last and out is not None and _usa_native_possible(taps, out):
        _usa_native(taps, out, accumulate=True)
        return out
    if out is not None and out.dtype == op and out.is_contiguous(memory_format=fmt):
        run(taps, out, accumulate=True)
        return out
    result = empty_output((B, C, H, W), device=taps.device, dtype=op, memory_format=fmt)
    if fmt == torch.channels_last and _usa_native_possible(taps, result):
        run = _usa_native
    run(taps, result, accumulate=False)
    if out is None:
        return result.to(taps.dtype)
    return out.add_(result)  # layout or dtype of `out` differs from the taps': one extra pass


def _usa_new_fake(taps, size):
    taps = _as_taps(taps)
    H, W = _check_usa(taps, size, None)
    B, _, C = taps.shape[:3]
    return torch.empty(
        (B, C, H, W), device=taps.device, dtype=taps.dtype, memory_format=_usa_out_format(taps)
    )


def _usa_acc_fake(taps, out):
    _check_usa(_as_taps(taps), out.shape[2:], out)


def _usa_new(impl):
    def new(taps: torch.Tensor, size: list[int]) -> torch.Tensor:
        return impl(taps, size)

    return new


def _usa_acc(impl):
    def accumulate(taps: torch.Tensor, out: torch.Tensor) -> None:
        impl(taps, out.shape[2:], out)

    return accumulate


_USA_IMPLS = {"torch": upsample_shift_add_torch, "triton": upsample_shift_add_triton}
UPSAMPLE_SHIFT_ADD = register_ops(
    "upsample_shift_add", {b: _usa_new(f) for b, f in _USA_IMPLS.items()}, _usa_new_fake
)
UPSAMPLE_SHIFT_ADD_ = register_ops(
    "upsample_shift_add_acc", {b: _usa_acc(f) for b, f in _USA_IMPLS.items()}, _usa_acc_fake, ("out",)
)


def upsample_shift_add(
    taps: torch.Tensor,
    size: list[int] | tuple[int, int],
    out: torch.Tensor | None = None,
    *,
    backend: str = "torch",
) -> torch.Tensor:
    """``sum_t shift_t(resize_bilinear(taps[:, t], size))`` (= ``conv3x3(resize(x))`` when ``taps`` are the
    1x1-conv taps of ``x``), as (B, C, H, W); accumulated into ``out`` (and returned) when given."""
    if out is None:
        return UPSAMPLE_SHIFT_ADD[backend](taps, [int(s) for s in size])
    if tuple(out.shape[2:]) != (int(size[0]), int(size[1])):
        raise ValueError(f"upsample_shift_add: out has spatial size {tuple(out.shape[2:])}, size is {size}")
    UPSAMPLE_SHIFT_ADD_[backend](taps, out)
    return out


# -------------------------------------------------------------------------------- upsample_shift_add_sum
def _check_usa_sum(base: torch.Tensor, taps: list[torch.Tensor]) -> list[torch.Tensor]:
    if base.dim() != 4:
        raise ValueError(f"upsample_shift_add_sum: expected an NCHW base, got shape {tuple(base.shape)}")
    taps = [_as_taps(t) for t in taps]
    B, C, H, W = base.shape
    for t in taps:
        _check_usa(t, (H, W), None)
        if (t.shape[0], t.shape[2]) != (B, C):
            raise ValueError(
                f"upsample_shift_add_sum: taps {tuple(t.shape)} do not match the base's (B, C) = {(B, C)}"
            )
    return taps


def _usa_sum_composed(base: torch.Tensor, taps: list[torch.Tensor], relu: bool, backend: str) -> torch.Tensor:
    """The definition: the base widened to its op-math dtype, each group's shift-add accumulated into it."""
    fmt = out_memory_format(base)
    out = empty_output(base.shape, dtype=opmath_dtype(base.dtype), device=base.device, memory_format=fmt)
    out.copy_(base)
    for t in taps:
        _USA_IMPLS[backend](t, base.shape[2:], out)
    return F.relu_(out) if relu else out


def _usa_sum_native_possible(base: torch.Tensor, taps: list[torch.Tensor]) -> bool:
    """Where ``csrc/usa.c``'s one-pass sum runs: a channels-last float32 or bfloat16 CPU base with unit
    channel stride, channels-last float32 or bfloat16 taps, C helpers built."""
    return (
        base.device.type == "cpu"
        and base.dtype in (torch.float32, torch.bfloat16)
        and base.stride(1) == 1
        and out_memory_format(base) == torch.channels_last
        and all(
            t.dtype in (torch.float32, torch.bfloat16) and _usa_out_format(t) == torch.channels_last
            for t in taps
        )
        and native.library() is not None
    )


def _usa_sum_native(base: torch.Tensor, taps: list[torch.Tensor], relu: bool) -> torch.Tensor:
    out = empty_output(base.shape, dtype=torch.float32, device=base.device, memory_format=torch.channels_last)
    _usa_sum_c(out, base, taps, relu)
    return out


def usa_sum_in_c(base: torch.Tensor, taps: list[torch.Tensor]) -> bool:
    """Whether ``upsample_shift_add_sum_torch`` runs the C pass for these inputs (the plan asks this too)."""
    return bool(taps) and _usa_sum_native_possible(base, [_as_taps(t) for t in taps])


def upsample_shift_add_sum_torch(base: torch.Tensor, taps: list[torch.Tensor], relu: bool) -> torch.Tensor:
    taps = _check_usa_sum(base, taps)
    if usa_sum_in_c(base, taps):
        return _usa_sum_native(base, taps, relu)
    return _usa_sum_composed(base, taps, relu, "torch")


def upsample_shift_add_sum_triton(base: torch.Tensor, taps: list[torch.Tensor], relu: bool) -> torch.Tensor:
    taps = _check_usa_sum(base, taps)
    check_triton_tensors(base, *taps)
    return _usa_sum_composed(base, taps, relu, "triton")


def _usa_sum_fake(base, taps, relu):
    _check_usa_sum(base, taps)
    return torch.empty_like(base, dtype=opmath_dtype(base.dtype), memory_format=out_memory_format(base))


UPSAMPLE_SHIFT_ADD_SUM = register_ops(
    "upsample_shift_add_sum",
    {"torch": upsample_shift_add_sum_torch, "triton": upsample_shift_add_sum_triton},
    _usa_sum_fake,
)


def upsample_shift_add_sum(
    base: torch.Tensor, taps: list[torch.Tensor], relu: bool = False, *, backend: str = "torch"
) -> torch.Tensor:
    """``relu?(base + sum_g upsample_shift_add(taps[g], base's size))`` in ``base``'s op-math dtype (float32
    for bfloat16/float16/float32): a split bottleneck's direct conv plus all its upsampled groups (and the
    BN-folded conv's ReLU). On CPU with channels-last float32/bfloat16 maps this is one pass in C
    (``csrc/usa.c``, ``usa_sum_nhwc``): each output pixel is written once, instead of a widening copy, a
    read-modify-write of the whole map per group and a ReLU pass (bench/results/decisions.md, "Bottleneck
    tail in one C pass")."""
    return UPSAMPLE_SHIFT_ADD_SUM[backend](base, list(taps), bool(relu))
