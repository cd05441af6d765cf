"""Winograd F(4x4, 3x3) and F(6x6, 3x3) convolution: 3x3, stride 1, zero padding 1 (CPU).

Replaces `F.conv2d(x, w, b, padding=1)` (+ ReLU) for the decode head's large 3x3 convolutions, where
oneDNN has no Winograd on AVX2. Each m x m output tile comes from an (m+2) x (m+2) input tile d:

    Y = Aᵀ [ (G g Gᵀ) ⊙ (Bᵀ d B) ] A

F(4x4): points 0, ±1, ±2, ∞ (Lavin & Gray 2015), 36 multiplies per tile and (Cin, Cout) pair instead of
144 (4x fewer). F(6x6): points 0, ±1, ±2, ±1/2, ∞, 64 instead of 324 (5.06x fewer), with larger rounding.
The element-wise products over channels become (m+2)² batched GEMMs (tiles x Cin) @ (Cin x Cout) on MKL,
true fp32. The tile transforms run in C (`csrc/winograd.c`, one pass each, OpenMP) when the native helpers
built, else in PyTorch (Kronecker-matrix GEMMs plus copies). Activations are channels-last (NHWC) so tiles
move as contiguous channel vectors; tiles are processed in row blocks of about `TARGET_TILES`, whose
workspaces are reused by every block.

Not exact: the transforms amplify rounding. Measured fp32 error against a float64 conv, relative to the
output's max, 512 channels at 128²: F(4x4) 6.6e-6, F(6x6) 1.0e-5, the direct fp32 conv 4.5e-6 (at 16-70
channels: 2-4e-6, 4-6e-6 and 2-8e-7).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import native
from ._common import bilinear_indices
from ._memory import empty_output


@dataclass(frozen=True)
class WinogradSpec:
    tile: int  # m: outputs per tile side
    bt: tuple[tuple[float, ...], ...]  # (m+2, m+2)
    g: tuple[tuple[float, ...], ...]  # (m+2, 3)
    at: tuple[tuple[float, ...], ...]  # (m, m+2)

    @property
    def points(self) -> int:
        return self.tile + 2


F43 = WinogradSpec(
    tile=4,
    bt=(
        (4, 0, -5, 0, 1, 0),
        (0, -4, -4, 1, 1, 0),
        (0, 4, -4, -1, 1, 0),
        (0, -2, -1, 2, 1, 0),
        (0, 2, -1, -2, 1, 0),
        (0, 4, 0, -5, 0, 1),
    ),
    g=(
        (1 / 4, 0, 0),
        (-1 / 6, -1 / 6, -1 / 6),
        (-1 / 6, 1 / 6, -1 / 6),
        (1 / 24, 1 / 12, 1 / 6),
        (1 / 24, -1 / 12, 1 / 6),
        (0, 0, 1),
    ),  # fmt: skip
    at=((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1)),
)
F63 = WinogradSpec(
    tile=6,
    bt=(
        (1, 0, -21 / 4, 0, 21 / 4, 0, -1, 0),
        (0, 1, 1, -17 / 4, -17 / 4, 1, 1, 0),
        (0, -1, 1, 17 / 4, -17 / 4, -1, 1, 0),
        (0, 1 / 2, 1 / 4, -5 / 2, -5 / 4, 2, 1, 0),
        (0, -1 / 2, 1 / 4, 5 / 2, -5 / 4, -2, 1, 0),
        (0, 2, 4, -5 / 2, -5, 1 / 2, 1, 0),
        (0, -2, 4, 5 / 2, -5, -1 / 2, 1, 0),
        (0, -1, 0, 21 / 4, 0, -21 / 4, 0, 1),
    ),
    g=(
        (1, 0, 0),
        (-2 / 9, -2 / 9, -2 / 9),
        (-2 / 9, 2 / 9, -2 / 9),
        (1 / 90, 1 / 45, 2 / 45),
        (1 / 90, -1 / 45, 2 / 45),
        (32 / 45, 16 / 45, 8 / 45),
        (32 / 45, -16 / 45, 8 / 45),
        (0, 0, 1),
    ),  # fmt: skip
    at=(
        (1, 1, 1, 1, 1, 1, 1, 0),
        (0, 1, -1, 2, -2, 1 / 2, -1 / 2, 0),
        (0, 1, 1, 4, 4, 1 / 4, 1 / 4, 0),
        (0, 1, -1, 8, -8, 1 / 8, -1 / 8, 0),
        (0, 1, 1, 16, 16, 1 / 16, 1 / 16, 0),
        (0, 1, -1, 32, -32, 1 / 32, -1 / 32, 1),
    ),
)
SPECS = {spec.tile: spec for spec in (F43, F63)}
_BY_POINTS = {spec.points**2: spec for spec in SPECS.values()}

# Tiles per block: bounds the workspaces whatever the image size; time is flat from 256 to 1024 on both
# CPU kinds measured (bench/results/decisions.md, "Winograd block size").
TARGET_TILES = 256


def spec_of(u: torch.Tensor) -> WinogradSpec:
    """The F(m x m, 3x3) that transformed filters `u` ((m+2)², Cin, Cout) belong to."""
    if u.dim() != 3 or u.shape[0] not in _BY_POINTS:
        raise ValueError(
            f"Winograd filters must be (36 or 64, Cin, Cout) from winograd_weight, got {tuple(u.shape)}"
        )
    return _BY_POINTS[u.shape[0]]


def _kron(m: tuple[tuple[float, ...], ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    t = torch.tensor(m, dtype=torch.float64)
    return torch.kron(t, t).to(dtype=dtype, device=device)


def winograd_weight(weight: torch.Tensor, tile: int = 4) -> torch.Tensor:
    """(Cout, Cin, 3, 3) → ((tile+2)², Cin, Cout) transformed filters U = G g Gᵀ of F(tile x tile, 3x3),
    computed in float64."""
    if tile not in SPECS:
        raise ValueError(f"Winograd tile must be one of {sorted(SPECS)}, got {tile}")
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"Winograd weights must be (Cout, Cin, 3, 3), got {tuple(weight.shape)}")
    spec = SPECS[tile]
    if _weight_native(weight):
        return _winograd_weight_native(weight.detach(), spec)
    g = torch.tensor(spec.g, dtype=torch.float64, device=weight.device)
    u = torch.einsum("ak,oikl,bl->abio", g, weight.detach().double(), g)
    # rounded before the layout copy: the same values, half the bytes copied (a model's first call makes these)
    return u.to(weight.dtype).reshape(spec.points**2, weight.shape[1], weight.shape[0]).contiguous()


def _weight_native(weight: torch.Tensor) -> bool:
    """Whether ``winograd_weight`` runs in C: a CPU float32 weight outside tracing, C helpers built."""
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and not torch.compiler.is_compiling()
        and native.library() is not None
    )


def _winograd_weight_native(weight: torch.Tensor, spec: WinogradSpec) -> torch.Tensor:
    """``winograd_weight`` by ``wino_weight`` (csrc/winograd.c): the same float64 sums, one C pass writing
    U's layout directly (ATen's einsum and layout copy took 0.22 s for a 512 x 1024 bank, ~0.45 s of a
    model's first call)."""
    cout, cin = weight.shape[:2]
    w = weight.contiguous()
    kron = _kron(spec.g, torch.float64, torch.device("cpu")).contiguous()
    u = torch.empty((spec.points**2, cin, cout), dtype=torch.float32)
    if u.numel():
        native.library().wino_weight(
            w.data_ptr(), cout, cin, kron.data_ptr(), spec.points**2, u.data_ptr(), torch.get_num_threads()
        )
    return u


def _scatter_tiles(tiles: torch.Tensor, out: torch.Tensor, row0: int) -> torch.Tensor:
    """Write output tiles (B, r, m, tw, m, C) (a view) into `out` (B, h, w, C) from row `row0`, clipping the
    tiles that overhang the bottom/right edge; returns the rows written."""
    batch, r, m, tw, _, c = tiles.shape
    h, w = out.shape[1:3]
    rows = min(m * r, h - row0)
    rf, twf = rows // m, w // m  # whole tile rows / columns inside the output
    out[:, row0 : row0 + m * rf, : m * twf].view(batch, rf, m, twf, m, c).copy_(tiles[:, :rf, :, :twf])
    if w > m * twf:  # right edge: the first w - m * twf columns of the last tile column
        cw = w - m * twf
        out[:, row0 : row0 + m * rf, m * twf :].view(batch, rf, m, cw, c).copy_(tiles[:, :rf, :, twf, :cw])
    if rows > m * rf:  # bottom edge: the first rows - m * rf rows of the last tile row, all columns
        rh = rows - m * rf
        edge = tiles[:, rf, :rh].reshape(batch, rh, m * tw, c)
        out[:, row0 + m * rf : row0 + rows].copy_(edge[:, :, :w])
    return out[:, row0 : row0 + rows]


def conv3x3_winograd(
    x: torch.Tensor,
    u: torch.Tensor,
    bias: torch.Tensor | None = None,
    relu: bool = False,
    x2: torch.Tensor | None = None,
    low: torch.Tensor | None = None,
) -> torch.Tensor:
    """3x3 conv, padding 1, of NCHW `x` with filters `u` from `winograd_weight` (its shape says F(4x4) or
    F(6x6)); returns a channels-last tensor (NCHW logical shape). With `x2` (same batch and size), the conv
    of their channel concatenation, which is never built. With `low` (same batch and channels as `x`, any
    size), the conv of ``x + resize_bilinear(low, x's size)`` (UPerNet's top-down sum), which the C
    transform forms while gathering its tiles, so it is never written. Tile transforms in C (`native.py`)
    for CPU float32 when they built, else in PyTorch."""
    groups = [x] if x2 is None else [x, x2]
    _check_groups(groups, u)
    check_low(x, low, "Winograd")
    if winograd_native(*groups, *([] if low is None else [low])):
        return _conv3x3_winograd_native(groups, u, bias, relu, low)
    if low is not None:
        x = x + F.interpolate(low.to(x.dtype), size=x.shape[2:], mode="bilinear", align_corners=False)
    return _conv3x3_winograd_torch(x if x2 is None else torch.cat([x, x2.to(x.dtype)], 1), u, bias, relu)


def check_low(x: torch.Tensor, low: torch.Tensor | None, op: str) -> None:
    """A top-down source ``low`` (added as ``resize(low)`` to ``x``) must match ``x``'s batch and channels."""
    if low is not None and (low.dim() != 4 or low.shape[:2] != x.shape[:2]):
        raise ValueError(f"{op}: low must be (B, C, h, w) like x {tuple(x.shape)}, got {tuple(low.shape)}")


def winograd_native(*inputs: torch.Tensor) -> bool:
    """Whether ``conv3x3_winograd`` on these inputs runs the C transforms: CPU float32, C helpers built."""
    return (
        all(t.device.type == "cpu" and t.dtype == torch.float32 for t in inputs)
        and native.library() is not None
    )


def _check_groups(groups: list[torch.Tensor], u: torch.Tensor) -> None:
    spec_of(u)
    x = groups[0]
    for g in groups:
        if g.dim() != 4 or g.shape[0] != x.shape[0] or g.shape[2:] != x.shape[2:]:
            raise ValueError(
                f"Winograd inputs must be NCHW with equal batch and size, got {[tuple(g.shape) for g in groups]}"
            )
    cin = sum(g.shape[1] for g in groups)
    if u.shape[1] != cin:
        raise ValueError(f"Winograd filters take {u.shape[1]} input channels, x has {cin}")


def _blocks(x: torch.Tensor, u: torch.Tensor) -> tuple[WinogradSpec, int, int, int]:
    """(spec, tile rows, tile columns, tile rows per block)."""
    spec = spec_of(u)
    m, batch = spec.tile, x.shape[0]
    th, tw = -(-x.shape[2] // m), -(-x.shape[3] // m)
    return spec, th, tw, max(1, min(th, TARGET_TILES // max(1, batch * tw)))


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) view of NCHW `t` with unit channel stride (the C gather reads channel vectors)."""
    tn = t.permute(0, 2, 3, 1)
    return tn if tn.stride(3) == 1 else t.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)


def _upsample_args(low: torch.Tensor | None, h: int, w: int) -> tuple:
    """The C input transform's (lo, lb, lh, lw, ij, lam) arguments for adding ``resize(low)`` (or nulls),
    and the tensors they point into, which must outlive the call."""
    if low is None:
        return None, 0, 0, 0, None, None, None
    ln = _nhwc(low)
    i0, i1, l0h, l1h = bilinear_indices(low.shape[2], h, torch.float32, "cpu")
    j0, j1, l0w, l1w = bilinear_indices(low.shape[3], w, torch.float32, "cpu")
    ij = (ctypes.c_void_p * 4)(*(t.data_ptr() for t in (i0, i1, j0, j1)))
    lam = (ctypes.c_void_p * 4)(*(t.data_ptr() for t in (l0h, l1h, l0w, l1w)))
    return ln.data_ptr(), *ln.stride()[:3], ij, lam, (ln, i0, i1, j0, j1, l0h, l1h, l0w, l1w)


def _conv3x3_winograd_native(
    groups: list[torch.Tensor],
    u: torch.Tensor,
    bias: torch.Tensor | None,
    relu: bool,
    low: torch.Tensor | None = None,
) -> torch.Tensor:
    lib = native.library()
    x = groups[0]
    spec, th, tw, rows = _blocks(x, u)
    transform_in = getattr(lib, f"wino_f{spec.tile}3_input")
    transform_out = getattr(lib, f"wino_f{spec.tile}3_output")
    batch, _, h, w = x.shape
    p2, cin, cout = spec.points**2, u.shape[1], u.shape[2]
    # NHWC views with unit channel stride (the C gather reads channel vectors), each group's first channel
    nhwc = []
    offset = 0
    for g in groups:
        nhwc.append((_nhwc(g), offset))
        offset += g.shape[1]
    lo, lb, lh, lw, ij, lam, _keep = _upsample_args(low, h, w)
    u = u.contiguous()
    b = None if bias is None else bias.to(torch.float32).contiguous()
    out = empty_output((batch, h, w, cout), dtype=x.dtype, device=x.device)
    n_max = batch * rows * tw
    threads = torch.get_num_threads()
    transformed = empty_output((p2 * n_max * cin,), dtype=x.dtype, device=x.device)
    products = empty_output((p2 * n_max * cout,), dtype=x.dtype, device=x.device)
    for r0 in range(0, th, rows):
        r = min(rows, th - r0)
        n = batch * r * tw
        v, m = transformed[: p2 * n * cin].view(p2, n, cin), products[: p2 * n * cout].view(p2, n, cout)
        for k, (gn, c0) in enumerate(nhwc):  # each group into its channel columns of v
            up = (lo, lb, lh, lw, ij, lam) if k == 0 else (None, 0, 0, 0, None, None)  # low adds to x only
            transform_in(
                gn.data_ptr(), *gn.stride()[:3], h, w, gn.shape[3], r0, r, tw, n, threads,
                v.data_ptr() + c0 * v.element_size(), cin, *up,
            )  # fmt: skip
        torch.bmm(v, u, out=m)  # (m+2)² GEMMs (tiles x Cin) @ (Cin x Cout)
        transform_out(
            m.data_ptr(), n, cout, r0, r, tw, threads, None if b is None else b.data_ptr(), int(relu),
            out.data_ptr(), *out.stride()[:3], h, w,
        )  # fmt: skip
    return out.permute(0, 3, 1, 2)


def _conv3x3_winograd_torch(
    x: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None, relu: bool
) -> torch.Tensor:
    _check_groups([x], u)
    spec, th, tw, rows = _blocks(x, u)
    batch, cin, h, w = x.shape
    mt, pt, cout = spec.tile, spec.points, u.shape[2]
    p2 = pt * pt
    xn = x.permute(0, 2, 3, 1)  # NHWC view (free when x is channels-last)
    bb = _kron(spec.bt, x.dtype, x.device)
    aa = _kron(spec.at, x.dtype, x.device)
    # Exactly (B, h, w, Cout): a padded buffer sliced to (h, w) would not be channels-last contiguous, and
    # every consumer (1x1 convs, the shift-add accumulation) would pay for that with copies.
    out = empty_output((batch, h, w, cout), dtype=x.dtype, device=x.device)
    # Zero-padded input rows of one block of tile rows (1 above, up to m * tw + 1 - w right/below), reused
    # for every block: a whole padded copy of x would be one more full-size buffer (page faults, no reuse).
    slab = x.new_zeros(batch, mt * rows + 2, mt * tw + 2, cin)
    s_b, s_h, s_w, s_c = slab.stride()
    # Block workspaces, reused by every block (fresh ones per block would page-fault each time): gathered
    # tiles, later reused for the output transform; transformed tiles; their products with the filters.
    n_max = batch * rows * tw
    gathered = empty_output((max(p2 * cin, mt * mt * cout) * n_max,), dtype=x.dtype, device=x.device)
    transformed = empty_output((p2 * n_max * cin,), dtype=x.dtype, device=x.device)
    products = empty_output((p2 * n_max * cout,), dtype=x.dtype, device=x.device)
    for r0 in range(0, th, rows):
        r = min(rows, th - r0)
        top = mt * r0 - 1  # input row held by slab row 0
        lo, hi = max(top, 0), min(top + mt * r + 2, h)
        slab[:, : lo - top].zero_()
        slab[:, lo - top : hi - top, 1 : w + 1].copy_(xn[:, lo:hi])
        slab[:, hi - top : mt * r + 2].zero_()
        # overlapping (m+2)² tiles (stride m) as a view: (m+2, m+2, batch, r, tw, Cin)
        tiles = slab.as_strided((pt, pt, batch, r, tw, cin), (s_h, s_w, s_b, mt * s_h, mt * s_w, s_c))
        n = batch * r * tw
        g = gathered[: p2 * n * cin].view(pt, pt, batch, r, tw, cin)
        g.copy_(tiles)
        v = torch.mm(bb, g.view(p2, n * cin), out=transformed[: p2 * n * cin].view(p2, n * cin))
        m = products[: p2 * n * cout].view(p2, n, cout)
        torch.bmm(v.view(p2, n, cin), u, out=m)  # (m+2)² GEMMs (tiles x Cin) @ (Cin x Cout)
        y = torch.mm(aa, m.view(p2, n * cout), out=gathered[: mt * mt * n * cout].view(mt * mt, n * cout))
        y = y.view(mt, mt, batch, r, tw, cout)
        dst = _scatter_tiles(y.permute(2, 3, 0, 4, 1, 5), out, mt * r0)
        if bias is not None:
            dst.add_(bias)
        if relu:
            dst.relu_()
    return out.permute(0, 3, 1, 2)


@torch.library.custom_op("upernet_fast::conv3x3_winograd_pair", mutates_args=())
def _conv3x3_winograd_pair_op(
    x: torch.Tensor, x2: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None, relu: bool
) -> torch.Tensor:
    return conv3x3_winograd(x, u, bias, relu, x2)


@_conv3x3_winograd_pair_op.register_fake
def _(x, x2, u, bias, relu):
    _check_groups([x, x2], u)
    return torch.empty(
        (x.shape[0], u.shape[2], *x.shape[2:]),
        dtype=x.dtype,
        device=x.device,
        memory_format=torch.channels_last,
    )


def conv3x3_winograd_pair(
    x: torch.Tensor, x2: torch.Tensor, u: torch.Tensor, bias: torch.Tensor | None = None, relu: bool = False
) -> torch.Tensor:
    """``conv3x3_winograd`` of the channel concatenation of ``x`` and ``x2`` as a registered op
    (``torch.ops.upernet_fast.conv3x3_winograd_pair``), so torch.compile treats it as one opaque call."""
    return torch.ops.upernet_fast.conv3x3_winograd_pair(x, x2, u, bias, relu)
