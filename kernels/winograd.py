"""Winograd F(4x4, 3x3) convolution: 3x3, stride 1, zero padding 1 (CPU, PyTorch ops).

Replaces `F.conv2d(x, w, b, padding=1)` (+ ReLU) for the decode head's large 3x3 convolutions, where
oneDNN has no Winograd on AVX2. Each 4x4 output tile comes from a 6x6 input tile d:

    Y = Aᵀ [ (G g Gᵀ) ⊙ (Bᵀ d B) ] A            (Lavin & Gray 2015, points 0, ±1, ±2, ∞)

so a tile costs 36 multiplies per (Cin, Cout) pair instead of 144: the 36 element-wise products over
channels become 36 batched GEMMs (tiles x Cin) @ (Cin x Cout) on MKL, true fp32. Input and output
transforms are 36x36 and 16x36 Kronecker matrices applied as GEMMs. Activations are handled channels-last
(NHWC) so tile gathers and output scatters move contiguous channel vectors; tiles are processed in row
blocks of about `TARGET_TILES` so each block's transformed data stays in cache.

Not exact: the transforms amplify rounding. Measured fp32 error against a float64 conv, 512 channels:
~6e-5 absolute at output scale ~8 (about 1e-5 relative), vs ~3e-6 for the direct conv.
"""

from __future__ import annotations

import torch

from . import native
from ._memory import empty_output

_BT = [
    [4, 0, -5, 0, 1, 0],
    [0, -4, -4, 1, 1, 0],
    [0, 4, -4, -1, 1, 0],
    [0, -2, -1, 2, 1, 0],
    [0, 2, -1, -2, 1, 0],
    [0, 4, 0, -5, 0, 1],
]
_G = [
    [1 / 4, 0, 0],
    [-1 / 6, -1 / 6, -1 / 6],
    [-1 / 6, 1 / 6, -1 / 6],
    [1 / 24, 1 / 12, 1 / 6],
    [1 / 24, -1 / 12, 1 / 6],
    [0, 0, 1],
]
_AT = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]

NATIVE_TARGET_TILES = 256  # tiles per block with the C transforms
TARGET_TILES = (
    256  # tiles per block (2 threads, 512 channels, ms at 128² / 64²): 128: 204/46, 256: 187/44, 512: 254/44
)


def _kron(m: list[list[float]], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    t = torch.tensor(m, dtype=torch.float64)
    return torch.kron(t, t).to(dtype=dtype, device=device)


def winograd_weight(weight: torch.Tensor) -> torch.Tensor:
    """(Cout, Cin, 3, 3) → (36, Cin, Cout) transformed filters U = G g Gᵀ, computed in float64."""
    g = torch.tensor(_G, dtype=torch.float64, device=weight.device)
    u = torch.einsum("ak,oikl,bl->abio", g, weight.detach().double(), g)
    return u.reshape(36, weight.shape[1], weight.shape[0]).to(weight.dtype).contiguous()


def _scatter_tiles(tiles: torch.Tensor, out: torch.Tensor, row0: int) -> torch.Tensor:
    """Write output tiles (B, r, 4, tw, 4, C) (a view) into `out` (B, h, w, C) from row `row0`, clipping the
    tiles that overhang the bottom/right edge; returns the rows written."""
    batch, r, _, tw, _, c = tiles.shape
    h, w = out.shape[1:3]
    rows = min(4 * r, h - row0)
    rf, twf = rows // 4, w // 4  # whole tile rows / columns inside the output
    out[:, row0 : row0 + 4 * rf, : 4 * twf].view(batch, rf, 4, twf, 4, c).copy_(tiles[:, :rf, :, :twf])
    if w > 4 * twf:  # right edge: the first w - 4 * twf columns of the last tile column
        cw = w - 4 * twf
        out[:, row0 : row0 + 4 * rf, 4 * twf :].view(batch, rf, 4, cw, c).copy_(tiles[:, :rf, :, twf, :cw])
    if rows > 4 * rf:  # bottom edge: the first rows - 4 * rf rows of the last tile row, all columns
        rh = rows - 4 * rf
        edge = tiles[:, rf, :rh].reshape(batch, rh, 4 * tw, c)
        out[:, row0 + 4 * rf : row0 + rows].copy_(edge[:, :, :w])
    return out[:, row0 : row0 + rows]


def conv3x3_winograd(
    x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None = None, relu: bool = False
) -> torch.Tensor:
    """3x3 conv, padding 1, of NCHW `x` with filters `u` from `winograd_weight`; returns a channels-last
    tensor (NCHW logical shape). Tile transforms in C (`native.py`) for CPU float32 when it built,
    else in PyTorch."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and native.library() is not None:
        return _conv3x3_winograd_native(x, u, bias, relu)
    return _conv3x3_winograd_torch(x, u, bias, relu)


def _conv3x3_winograd_native(
    x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None, relu: bool
) -> torch.Tensor:
    lib = native.library()
    batch, cin, h, w = x.shape
    cout = u.shape[2]
    th, tw = -(-h // 4), -(-w // 4)
    xn = x.permute(0, 2, 3, 1)
    if xn.stride(3) != 1:  # the C gather reads channel vectors
        xn = x.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
    u = u.contiguous()
    b = None if bias is None else bias.to(torch.float32).contiguous()
    out = empty_output((batch, h, w, cout), dtype=x.dtype, device=x.device)
    rows = max(1, min(th, NATIVE_TARGET_TILES // max(1, batch * tw)))
    n_max = batch * rows * tw
    threads = torch.get_num_threads()
    transformed = empty_output((36, n_max, cin), dtype=x.dtype, device=x.device)
    products = empty_output((36, n_max, cout), dtype=x.dtype, device=x.device)
    for r0 in range(0, th, rows):
        r = min(rows, th - r0)
        n = batch * r * tw
        v, m = transformed.view(-1)[: 36 * n * cin].view(36, n, cin), products.view(-1)[: 36 * n * cout]
        lib.wino_f43_input(xn.data_ptr(), *xn.stride()[:3], h, w, cin, r0, r, tw, n, threads, v.data_ptr())
        torch.bmm(v, u, out=m.view(36, n, cout))  # 36 GEMMs (tiles x Cin) @ (Cin x Cout)
        lib.wino_f43_output(
            m.data_ptr(), n, cout, r0, r, tw, threads, None if b is None else b.data_ptr(), int(relu),
            out.data_ptr(), *out.stride()[:3], h, w,
        )  # fmt: skip
    return out.permute(0, 3, 1, 2)


def _conv3x3_winograd_torch(
    x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None, relu: bool
) -> torch.Tensor:
    batch, cin, h, w = x.shape
    cout = u.shape[2]
    th, tw = -(-h // 4), -(-w // 4)
    xn = x.permute(0, 2, 3, 1)  # NHWC view (free when x is channels-last)
    bb = _kron(_BT, x.dtype, x.device)
    aa = _kron(_AT, x.dtype, x.device)
    # Exactly (B, h, w, Cout): a padded buffer sliced to (h, w) would not be channels-last contiguous, and
    # every consumer (1x1 convs, the shift-add accumulation) would pay for that with copies.
    out = empty_output((batch, h, w, cout), dtype=x.dtype, device=x.device)
    rows = max(1, min(th, TARGET_TILES // max(1, batch * tw)))
    # Zero-padded input rows of one block of tile rows (1 above, up to 4 * tw + 1 - w right/below), reused
    # for every block: a whole padded copy of x would be one more full-size buffer (page faults, no reuse).
    slab = x.new_zeros(batch, 4 * rows + 2, 4 * tw + 2, cin)
    s_b, s_h, s_w, s_c = slab.stride()
    # Block workspaces, reused by every block (fresh ones per block would page-fault each time): gathered
    # tiles, later reused for the output transform; transformed tiles; their products with the filters.
    n_max = batch * rows * tw
    gathered = empty_output((max(36 * cin, 16 * cout) * n_max,), dtype=x.dtype, device=x.device)
    transformed = empty_output((36 * n_max * cin,), dtype=x.dtype, device=x.device)
    products = empty_output((36 * n_max * cout,), dtype=x.dtype, device=x.device)
    for r0 in range(0, th, rows):
        r = min(rows, th - r0)
        top = 4 * r0 - 1  # input row held by slab row 0
        lo, hi = max(top, 0), min(top + 4 * r + 2, h)
        slab[:, : lo - top].zero_()
        slab[:, lo - top : hi - top, 1 : w + 1].copy_(xn[:, lo:hi])
        slab[:, hi - top : 4 * r + 2].zero_()
        # overlapping 6x6 tiles (stride 4) as a view: (6, 6, batch, r, tw, Cin)
        tiles = slab.as_strided((6, 6, batch, r, tw, cin), (s_h, s_w, s_b, 4 * s_h, 4 * s_w, s_c))
        n = batch * r * tw
        g = gathered[: 36 * n * cin].view(6, 6, batch, r, tw, cin)
        g.copy_(tiles)
        v = torch.mm(bb, g.view(36, n * cin), out=transformed[: 36 * n * cin].view(36, n * cin))
        m = products[: 36 * n * cout].view(36, n, cout)
        torch.bmm(v.view(36, n, cin), u, out=m)  # 36 GEMMs (tiles x Cin) @ (Cin x Cout)
        y = torch.mm(aa, m.view(36, n * cout), out=gathered[: 16 * n * cout].view(16, n * cout))
        y = y.view(4, 4, batch, r, tw, cout)
        dst = _scatter_tiles(y.permute(2, 3, 0, 4, 1, 5), out, 4 * r0)
        if bias is not None:
            dst.add_(bias)
        if relu:
            dst.relu_()
    return out.permute(0, 3, 1, 2)
