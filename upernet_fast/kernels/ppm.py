"""Adaptive average pooling at several output sizes in one pass (UPerNet's pyramid pooling module).

Replaces ``[F.adaptive_avg_pool2d(x, s) for s in scales]``. Adaptive pooling bin ``i`` of ``s`` over an axis
of length ``H`` covers rows ``[floor(i*H/s), ceil((i+1)*H/s))``: bins overlap when ``s`` does not divide
``H``, and ``s`` may exceed ``H`` (bins then repeat rows). Per scale this is a matrix sandwich

    pool_s(X) = (P_s X Q_s^T) / (|row bin| * |col bin|)

with 0/1 membership matrices ``P_s`` (s x H) and ``Q_s`` (s x W); the sums are exact-weight (0/1) so the
only difference from PyTorch is the order of the additions (and PyTorch too divides the sum by the count).

Triton: the input is a (B*C) x (H*W) matrix and all scales' bins together are ``NB = sum(s^2)`` columns
of a membership matrix that the kernel builds on the fly from four small int tables (row/col bin bounds),
so one program reads its tile of x once and accumulates it into every bin of every scale with one
``tl.dot`` (fp32, ``input_precision="ieee"``); the epilogue divides by the bin areas.

PyTorch path: the same single pass as the kernel, as one GEMM ``(B*C, H*W) @ M`` with the cached 0/1
membership matrix M (H*W, NB), then a division by the areas (for maps where M would exceed 4M entries, the
separable sandwich with all scales stacked: ``P @ X @ Q^T``, keeping the diagonal blocks). Faster than the four
adaptive pools and than the separable form (bench/results/decisions.md, "adaptive_pool_multi"). Float16 is computed in float32.
"""

from functools import lru_cache

import torch

from ._common import check_triton_tensors, opmath_dtype, register_ops, tl, triton

__all__ = ["adaptive_pool_multi", "adaptive_pool_multi_triton", "adaptive_pool_multi_torch"]


def _bins(n: int, s: int) -> list[tuple[int, int]]:
    return [((i * n) // s, -((-(i + 1) * n) // s)) for i in range(s)]


@lru_cache(maxsize=64)
def _bin_tables(H: int, W: int, scales: tuple[int, ...], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 (4, NB) [h_start, h_end, w_start, w_end] and float32 (NB,) areas, bins ordered scale-major."""
    rows = []
    for s in scales:
        for hs, he in _bins(H, s):
            for ws, we in _bins(W, s):
                rows.append((hs, he, ws, we))
    t = torch.tensor(rows, dtype=torch.int32).t().contiguous()
    area = ((t[1] - t[0]) * (t[3] - t[2])).to(torch.float32)
    return t.to(device), area.to(device)


@triton.jit
def _adaptive_pool_multi_kernel(
    x_ptr, bins_ptr, area_ptr, y_ptr,
    C, R, H, W, NB,
    sx_b, sx_c, sx_h, sx_w,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_NB: tl.constexpr,
):  # fmt: skip
    pid_r = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)  # row = b * C + c
    r_mask = offs_r < R
    x_row = x_ptr + (offs_r // C).to(tl.int64) * sx_b + (offs_r % C) * sx_c

    offs_n = pid_n * BLOCK_NB + tl.arange(0, BLOCK_NB)
    n_mask = offs_n < NB
    hs = tl.load(bins_ptr + offs_n, mask=n_mask, other=0)
    he = tl.load(bins_ptr + NB + offs_n, mask=n_mask, other=0)
    ws = tl.load(bins_ptr + 2 * NB + offs_n, mask=n_mask, other=0)
    we = tl.load(bins_ptr + 3 * NB + offs_n, mask=n_mask, other=0)

    acc = tl.zeros((BLOCK_R, BLOCK_NB), dtype=tl.float32)
    for k0 in range(0, H * W, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < H * W
        h = offs_k // W
        w = offs_k % W
        xt = tl.load(
            x_row[:, None] + (h * sx_h + w * sx_w)[None, :], mask=r_mask[:, None] & k_mask[None, :], other=0.0
        ).to(tl.float32)
        # 0/1 membership of pixel k in bin n, for every bin of every scale at once.
        inside = (
            (h[:, None] >= hs[None, :]) & (h[:, None] < he[None, :]) & (w[:, None] >= ws[None, :]) & (w[:, None] < we[None, :])
        )  # fmt: skip
        acc = tl.dot(xt, inside.to(tl.float32), acc, input_precision="ieee")

    area = tl.load(area_ptr + offs_n, mask=n_mask, other=1.0)
    acc = acc / area[None, :]
    y = y_ptr + offs_r[:, None] * NB + offs_n[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=r_mask[:, None] & n_mask[None, :])


def _check(x: torch.Tensor, scales: list[int]) -> None:
    if x.dim() != 4 or not scales or any(int(s) < 1 for s in scales):
        raise ValueError(
            f"adaptive_pool_multi: expected NCHW x and positive scales, got {tuple(x.shape)}, {scales}"
        )


def adaptive_pool_multi_triton(x: torch.Tensor, scales: list[int]) -> list[torch.Tensor]:
    _check(x, scales)
    check_triton_tensors(x)
    B, C, H, W = x.shape
    bins, area = _bin_tables(H, W, tuple(int(s) for s in scales), str(x.device))
    NB = bins.shape[1]
    y = torch.empty((B, C, NB), device=x.device, dtype=x.dtype)
    BLOCK_R, BLOCK_K = 32, 32
    BLOCK_NB = min(max(triton.next_power_of_2(NB), 16), 128)
    grid = (triton.cdiv(B * C, BLOCK_R), triton.cdiv(NB, BLOCK_NB))
    _adaptive_pool_multi_kernel[grid](
        x, bins, area, y, C, B * C, H, W, NB, *x.stride(), BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K, BLOCK_NB=BLOCK_NB
    )
    return _split(y, scales)


def _split(y: torch.Tensor, scales: list[int]) -> list[torch.Tensor]:
    """(B, C, sum s^2) -> [(B, C, s, s)], each its own storage (custom-op outputs must not alias)."""
    outs, off = [], 0
    for s in scales:
        outs.append(
            y[:, :, off : off + s * s]
            .reshape(y.shape[0], y.shape[1], s, s)
            .clone(memory_format=torch.contiguous_format)
        )
        off += s * s
    return outs


@lru_cache(maxsize=64)
def _pool_plan(H: int, W: int, scales: tuple[int, ...], dtype: torch.dtype, device: str) -> tuple:
    """0/1 membership of pixel (h, w) in every bin of every scale, (H*W, NB) with bins scale-major, and the
    (NB,) bin areas; or, for maps too large for that, the separable factors P (S, H), Q^T (W, S)."""
    r_h, r_w = torch.arange(H), torch.arange(W)
    P = torch.stack([(r_h >= a) & (r_h < b) for s in scales for a, b in _bins(H, s)]).to(dtype)
    Q = torch.stack([(r_w >= a) & (r_w < b) for s in scales for a, b in _bins(W, s)]).to(dtype)
    areas, blocks, off = [], [], 0
    for s in scales:
        Ps, Qs = P[off : off + s], Q[off : off + s]
        areas.append((Ps.sum(1)[:, None] * Qs.sum(1)[None, :]).flatten())
        blocks.append(torch.einsum("ih,jw->hwij", Ps, Qs).reshape(H * W, s * s))
        off += s
    area = torch.cat(areas).to(device)
    if H * W * area.numel() <= 1 << 22:  # one GEMM reading x once: (B*C, H*W) @ (H*W, NB)
        return "gemm", torch.cat(blocks, 1).contiguous().to(device), area
    return "separable", (P.to(device), Q.t().contiguous().to(device)), area


def adaptive_pool_multi_torch(x: torch.Tensor, scales: list[int]) -> list[torch.Tensor]:
    _check(x, scales)
    B, C, H, W = x.shape
    key = tuple(int(s) for s in scales)
    op = opmath_dtype(x.dtype)
    kind, mats, area = _pool_plan(H, W, key, op, str(x.device))
    if kind == "gemm":
        sums = (x.reshape(B * C, H * W).to(op) @ mats).view(B, C, -1)  # reshape copies channels-last x
    else:
        P, Qt = mats
        full = P @ (x.to(op) @ Qt)  # (B, C, S, S): every row bin x every col bin; keep the diagonal blocks
        parts, off = [], 0
        for s in key:
            parts.append(full[:, :, off : off + s, off : off + s].reshape(B, C, s * s))
            off += s
        sums = torch.cat(parts, 2)
    return _split((sums / area).to(x.dtype), key)


def _adaptive_pool_multi_fake(x, scales):
    return [x.new_empty((x.shape[0], x.shape[1], s, s)) for s in scales]


ADAPTIVE_POOL_MULTI = register_ops(
    "adaptive_pool_multi",
    {"torch": adaptive_pool_multi_torch, "triton": adaptive_pool_multi_triton},
    _adaptive_pool_multi_fake,
)


def adaptive_pool_multi(x: torch.Tensor, scales: list[int], *, backend: str = "torch") -> list[torch.Tensor]:
    """``[F.adaptive_avg_pool2d(x, s) for s in scales]`` in one pass over ``x`` (contiguous outputs)."""
    return ADAPTIVE_POOL_MULTI[backend](x, list(scales))
