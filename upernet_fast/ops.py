"""TEMPORARY plain-PyTorch ops until kernels/ + dispatch land (same API)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def conv_bn_relu(x, weight, bias, padding: int, relu: bool):
    y = F.conv2d(x, weight, bias, padding=padding)
    return F.relu_(y) if relu else y


def adaptive_pool_multi(x, scales):
    return [F.adaptive_avg_pool2d(x, s) for s in scales]


def topdown_add(hi, lo):
    return hi + F.interpolate(lo, size=hi.shape[2:], mode="bilinear", align_corners=False)


def _interp_matrix(out_size: int, in_size: int, shift: int, dtype, device) -> torch.Tensor:
    """(out, in) bilinear (align_corners=False) matrix whose row Y is row Y+shift of the plain one (0 outside)."""
    scale = in_size / out_size
    m = torch.zeros(out_size, in_size, dtype=torch.float64)
    for y in range(out_size):
        ys = y + shift
        if not 0 <= ys < out_size:
            continue
        src = max((ys + 0.5) * scale - 0.5, 0.0)
        i0 = min(int(math.floor(src)), in_size - 1)
        i1 = min(i0 + 1, in_size - 1)
        lam = src - i0
        m[y, i0] += 1 - lam
        m[y, i1] += lam
    return m.to(dtype=dtype, device=device)


def upsample_shift_add(taps, size, out=None):
    """taps: (B, 9*C, h, w) in (ky, kx, C) order → Σ_t shift_t(U(taps_t)) at size (H, W)."""
    B, C9, h, w = taps.shape
    C = C9 // 9
    H, W = size
    t = taps.reshape(B, 3, 3, C * h, w)
    result = torch.zeros(B, C, H, W, dtype=taps.dtype, device=taps.device) if out is None else out
    for ky in range(3):
        z = None
        for kx in range(3):
            rx = _interp_matrix(W, w, kx - 1, taps.dtype, taps.device)
            part = t[:, ky, kx] @ rx.T  # (B, C*h, W)
            z = part if z is None else z + part
        ry = _interp_matrix(H, h, ky - 1, taps.dtype, taps.device)
        result = result + (ry @ z.reshape(B, C, h, W)).reshape(B, C, H, W)
    return result


def resize_bilinear(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)
