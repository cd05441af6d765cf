"""Winograd F(4x4,3x3) and F(6x6,3x3) against a float64 direct convolution (not exact: the transforms
amplify rounding), with the C and the PyTorch tile transforms.

Tolerance, fp32: max |error| <= BOUND x max |output| (measured at 512 channels: F(4x4) ~7e-6, F(6x6) ~1e-5
relative), and at most FACTOR x the direct fp32 conv's own error + 1e-6 x scale, so a silent algebra bug
(an O(1) error) cannot hide in it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from upernet_fast.kernels import native
from upernet_fast.kernels.winograd import (
    SPECS,
    _conv3x3_winograd_native,
    _conv3x3_winograd_torch,
    conv3x3_winograd,
    winograd_weight,
)

BOUND = {4: 5e-5, 6: 1e-4}
FACTOR = {4: 30, 6: 100}
# Both transform implementations: C (kernels/csrc, the default where it builds) and PyTorch (the fallback).
PATHS = {
    "native": lambda x, u, bias, relu: _conv3x3_winograd_native([x], u, bias, relu),
    "torch": _conv3x3_winograd_torch,
}


@pytest.mark.parametrize(
    "batch,cin,cout,h,w",
    [
        (1, 3, 5, 1, 1),
        (2, 7, 9, 13, 17),
        (1, 16, 8, 4, 4),
        (2, 33, 17, 29, 35),
        (1, 64, 64, 64, 48),
        (3, 8, 8, 5, 130),
        (2, 130, 72, 9, 11),  # channel counts that are not multiples of the C code's 64-channel blocks
        (1, 70, 90, 5, 4),
    ],
)
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("tile", [4, 6])
def test_winograd_matches_float64_conv(batch, cin, cout, h, w, relu, path, tile):
    if path == "native" and native.library() is None:
        pytest.fail("the native Winograd transforms did not build (see the RuntimeWarning)")
    g = torch.Generator().manual_seed(batch * 1000 + cin + h)
    x = torch.randn(batch, cin, h, w, generator=g)
    weight = torch.randn(cout, cin, 3, 3, generator=g) / (9 * cin) ** 0.5
    bias = torch.randn(cout, generator=g)
    ref = F.conv2d(x.double(), weight.double(), bias.double(), padding=1)
    direct = F.conv2d(x, weight, bias, padding=1)
    if relu:
        ref, direct = F.relu(ref), F.relu(direct)
    out = PATHS[path](x, winograd_weight(weight, tile), bias, relu)
    assert out.shape == ref.shape
    # a dense channels-last tensor even when h, w are not multiples of the 4x4 tile (edge tiles clipped)
    assert (
        out.is_contiguous(memory_format=torch.channels_last)
        and out.untyped_storage().nbytes() == 4 * out.numel()
    )
    scale = ref.abs().max().item()
    err = (out.double() - ref).abs()
    direct_err = (direct.double() - ref).abs().max().item()
    worst = tuple(int(i) for i in torch.unravel_index(err.argmax(), err.shape))
    assert err.max().item() <= BOUND[tile] * scale, (
        f"error {err.max().item():.3g} at {worst}, scale {scale:.3g}"
    )
    assert err.max().item() <= FACTOR[tile] * direct_err + 1e-6 * scale, (
        f"error {err.max().item():.3g} vs direct {direct_err:.3g}"
    )


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("tile", [4, 6])
def test_winograd_channels_last_and_noncontiguous_input(path, tile):
    conv3x3_winograd = PATHS[path]
    x = torch.randn(1, 12, 20, 23).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(6, 12, 3, 3) / 10
    ref = F.conv2d(x.double(), weight.double(), padding=1)
    torch.testing.assert_close(
        conv3x3_winograd(x, winograd_weight(weight, tile), None, False).double(), ref, rtol=0, atol=5e-5 * 5
    )
    xs = torch.randn(1, 12, 40, 23)[:, :, ::2]  # strided view
    ref = F.conv2d(xs.double(), weight.double(), padding=1)
    torch.testing.assert_close(
        conv3x3_winograd(xs, winograd_weight(weight, tile), None, False).double(), ref, rtol=0, atol=5e-5 * 5
    )


def test_winograd_native_is_the_default_and_thread_count_independent():
    """conv3x3_winograd takes the C transforms where they built; every tile is computed by one thread,
    so the result is bitwise the same for 1 and 2 threads."""
    if native.library() is None:
        pytest.fail("the native Winograd transforms did not build (see the RuntimeWarning)")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 96, 37, 29, generator=g)
    u = winograd_weight(torch.randn(80, 96, 3, 3, generator=g) / 30, 6)
    bias = torch.randn(80, generator=g)
    out = conv3x3_winograd(x, u, bias, relu=True)
    assert torch.equal(out, _conv3x3_winograd_native([x], u, bias, True))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = _conv3x3_winograd_native([x], u, bias, True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(out, single)


@pytest.mark.parametrize("tile", [4, 6])
@pytest.mark.parametrize("cout,cin", [(1, 1), (5, 4), (70, 3), (130, 17)])  # 64-channel blocks of the C pass
def test_winograd_weight_in_c_matches_float64(tile, cout, cin):
    """The C transform (the default for CPU float32) is U = G g Gᵀ in float64 rounded once: within an ulp
    of the float64 einsum's value, whatever the summation order; a float64 weight takes the einsum."""
    if native.library() is None:
        pytest.fail("the native helpers did not build (see the RuntimeWarning)")
    w = torch.randn(cout, cin, 3, 3, generator=torch.Generator().manual_seed(cout + cin))
    u = winograd_weight(w, tile)
    g = torch.tensor(SPECS[tile].g, dtype=torch.float64)
    exact = torch.einsum("ak,oikl,bl->abio", g, w.double(), g).reshape(u.shape)
    assert u.dtype == torch.float32 and u.is_contiguous()
    ulp = torch.finfo(torch.float32).eps * exact.abs().clamp_min(torch.finfo(torch.float32).tiny)
    assert ((u.double() - exact).abs() <= ulp).all()
    u64 = winograd_weight(w.double(), tile)
    assert u64.dtype == torch.float64 and torch.equal(u64, exact.contiguous())


def test_winograd_weight_and_filter_shape_errors():
    w = torch.randn(5, 4, 3, 3)
    assert winograd_weight(w).shape == (36, 4, 5) and winograd_weight(w, 6).shape == (64, 4, 5)
    with pytest.raises(ValueError, match="tile must be one of"):
        winograd_weight(w, 5)
    for bad in (torch.randn(5, 4, 5, 5), torch.randn(5, 4, 9)):
        with pytest.raises(ValueError, match=r"must be \(Cout, Cin, 3, 3\)"):
            winograd_weight(bad, 6)
    with pytest.raises(ValueError, match="36 or 64"):
        conv3x3_winograd(torch.randn(1, 4, 8, 8), torch.randn(49, 4, 5))
    with pytest.raises(ValueError, match="take 4 input channels, x has 3"):
        conv3x3_winograd(torch.randn(1, 3, 8, 8), winograd_weight(w))


@pytest.mark.parametrize("tile", [4, 6])
@pytest.mark.parametrize("native_path", [True, False])
def test_winograd_pair_is_the_conv_of_the_concatenation(tile, native_path, monkeypatch):
    """Two input groups transformed into one set of tiles: the conv of their channel concatenation."""
    from upernet_fast.kernels.winograd import conv3x3_winograd_pair

    if not native_path:
        monkeypatch.setattr(native, "library", lambda: None)
    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 70, 19, 23, generator=g)
    x2 = torch.randn(2, 45, 19, 23, generator=g).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(33, 115, 3, 3, generator=g) / 30
    bias = torch.randn(33, generator=g)
    cat = torch.cat([x, x2], 1).double()
    ref = F.relu(F.conv2d(cat, weight.double(), bias.double(), padding=1))
    direct_err = (F.relu(F.conv2d(cat.float(), weight, bias, padding=1)).double() - ref).abs().max().item()
    out = conv3x3_winograd_pair(x, x2, winograd_weight(weight, tile), bias, True)
    assert out.shape == ref.shape and out.is_contiguous(memory_format=torch.channels_last)
    err, scale = (out.double() - ref).abs().max().item(), ref.abs().max().item()
    assert err <= BOUND[tile] * scale and err <= FACTOR[tile] * direct_err + 1e-6 * scale, (err, direct_err)
    with pytest.raises(ValueError, match="take 115 input channels, x has 114"):
        conv3x3_winograd(x, winograd_weight(weight, tile), x2=x2[:, :44])
    with pytest.raises(ValueError, match="equal batch and size"):
        conv3x3_winograd(x, winograd_weight(weight, tile), x2=x2[:, :, :5])


@pytest.mark.parametrize("tile", [4, 6])
@pytest.mark.parametrize("native_path", [True, False])
@pytest.mark.parametrize("low_size", [(10, 12), (7, 23), (19, 23)])  # 2x, uneven, 1x (no resize)
def test_winograd_with_low_is_the_conv_of_the_topdown_sum(tile, native_path, low_size, monkeypatch):
    """`low` (UPerNet's top-down add, fused into the C gather): the conv of x + resize_bilinear(low) on odd
    sizes and channel counts (not multiples of the 64-channel blocks), against float64; also the pair."""
    if not native_path:
        monkeypatch.setattr(native, "library", lambda: None)
    g = torch.Generator().manual_seed(12)
    x = torch.randn(2, 70, 19, 23, generator=g).contiguous(memory_format=torch.channels_last)
    low = torch.randn(2, 70, *low_size, generator=g)  # NCHW: the gather takes any layout
    weight = torch.randn(33, 70, 3, 3, generator=g) / 25
    bias = torch.randn(33, generator=g)
    summed = x.double() + F.interpolate(low.double(), size=(19, 23), mode="bilinear", align_corners=False)
    ref = F.relu(F.conv2d(summed, weight.double(), bias.double(), padding=1))
    direct = F.relu(F.conv2d(summed.float(), weight, bias, padding=1)).double()
    direct_err = (direct - ref).abs().max().item()
    out = conv3x3_winograd(x, winograd_weight(weight, tile), bias, True, low=low)
    assert out.shape == ref.shape and out.is_contiguous(memory_format=torch.channels_last)
    err, scale = (out.double() - ref).abs().max().item(), ref.abs().max().item()
    assert err <= BOUND[tile] * scale and err <= FACTOR[tile] * direct_err + 1e-6 * scale, (err, direct_err)
    with pytest.raises(ValueError, match="low must be"):
        conv3x3_winograd(x, winograd_weight(weight, tile), low=low[:, :5])
