"""PyTorch paths of the fused ops (kernels/) against the plain PyTorch compositions they replace,
torch.compile tracing through the registered ops, and the backend dispatch.

Tolerances: float64 must match to float rounding (the rewrites are exact identities); float32/float16 follow
the project rule "error vs a float64 reference <= 2x PyTorch's own error in the same dtype + a small atol".
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from upernet_fast import dispatch
from upernet_fast.folding import fold_batchnorm_tensors
from upernet_fast.kernels import (
    adaptive_pool_multi,
    conv3x3_taps_weight,
    conv_bn_relu,
    fpn,
    native,
    resize_argmax,
    resize_bilinear,
    topdown_add,
    upsample_shift_add,
)
from upernet_fast.kernels._common import native_bf16
from upernet_fast.kernels.resize import resize_argmax_torch

FACTOR = 2.0  # kernel error may be at most FACTOR x PyTorch's own error in the same dtype ...
ATOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3}  # ... plus this


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, what: str = "") -> None:
    """Elementwise |actual - expected| <= atol, with a report of count, max error and worst index."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual.double() - expected.double()).abs()
    bad = ~(diff <= atol)  # NaN counts as bad
    if bad.any():
        worst = tuple(
            int(i) for i in torch.unravel_index(torch.nan_to_num(diff, nan=float("inf")).argmax(), diff.shape)
        )
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {diff.numel()} elements differ by more than {atol:.3g}; "
            f"max error {diff.max().item():.3g} at {worst}: got {actual[worst].item():.8g}, "
            f"expected {expected[worst].item():.8g}"
        )


def assert_rule(out: torch.Tensor, plain: torch.Tensor, ref64: torch.Tensor, what: str) -> None:
    """The tolerance rule: |out - ref64| <= FACTOR * max|plain - ref64| + ATOL[dtype]."""
    own = (plain.double() - ref64).abs().max().item()
    assert_close(
        out, ref64, FACTOR * own + ATOL[out.dtype], f"{what} ({out.dtype}, PyTorch's own error {own:.3g})"
    )


def rand(*shape: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def cl(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


# ------------------------------------------------------------------------------------------ conv_bn_relu
@pytest.mark.parametrize("conv_bias", [False, True])
def test_fold_batchnorm_matches_conv_bn(conv_bias: bool) -> None:
    conv = torch.nn.Conv2d(6, 5, 3, padding=1, bias=conv_bias).double()
    bn = torch.nn.BatchNorm2d(5, eps=1e-5).double().eval()
    with torch.no_grad():
        bn.running_mean.copy_(rand(5, seed=1, dtype=torch.float64))
        bn.running_var.copy_(rand(5, seed=2, dtype=torch.float64).abs() + 0.3)
        bn.weight.copy_(rand(5, seed=3, dtype=torch.float64))
        bn.bias.copy_(rand(5, seed=4, dtype=torch.float64))
    x = rand(2, 6, 7, 9, dtype=torch.float64)
    w, b = fold_batchnorm_tensors(
        conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps
    )
    with torch.no_grad():
        assert_close(F.conv2d(x, w, b, padding=1), bn(conv(x)), 1e-12, "folded conv vs conv+bn (fp64)")
    # float32 inputs: folded in float64, rounded once.
    args32 = [t.float() if t is not None else None for t in (conv.weight, conv.bias, bn.weight, bn.bias)]
    w32, b32 = fold_batchnorm_tensors(*args32, bn.running_mean.float(), bn.running_var.float(), bn.eps)
    w64, b64 = fold_batchnorm_tensors(
        *[t.double() if t is not None else None for t in args32],
        bn.running_mean.float().double(),
        bn.running_var.float().double(),
        bn.eps,
    )
    assert w32.dtype == torch.float32 and torch.equal(w32, w64.float()) and torch.equal(b32, b64.float())


@pytest.mark.parametrize("k,pad", [(3, 1), (1, 0), (3, 0)])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_conv_bn_relu_torch(k: int, pad: int, relu: bool, layout: str) -> None:
    x = rand(2, 7, 11, 13)
    x = cl(x) if layout == "cl" else x
    w, b = rand(9, 7, k, k, seed=1), rand(9, seed=2)
    y = conv_bn_relu(x, w, b, pad, relu)
    plain = F.conv2d(x, w, b, padding=pad)
    plain = F.relu(plain) if relu else plain
    assert_close(y, plain, 1e-6, "conv_bn_relu vs conv2d(+relu)")
    assert y.is_contiguous(memory_format=torch.channels_last if layout == "cl" else torch.contiguous_format)
    assert_close(conv_bn_relu(x, w, None, pad, relu), F.relu(F.conv2d(x, w, None, padding=pad)) if relu else
                 F.conv2d(x, w, None, padding=pad), 1e-6, "no bias")  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k,pad", [(3, 1), (1, 0)])
def test_conv_bn_relu_fused_relu_post_op(k: int, pad: int, dtype: torch.dtype, monkeypatch) -> None:
    """Channels-last CPU input with ReLU: oneDNN's conv with the ReLU post-op runs, and its result is
    bitwise conv2d then ReLU (ReLU commutes with the final rounding)."""
    cbr = importlib.import_module("upernet_fast.kernels.conv_bn_relu")
    if cbr._CONV_POINTWISE is None or not torch.backends.mkldnn.is_available():
        pytest.skip("this PyTorch build has no oneDNN pointwise convolution")
    calls = []
    real = cbr._CONV_POINTWISE
    monkeypatch.setattr(cbr, "_CONV_POINTWISE", lambda *a: calls.append(a[7]) or real(*a))
    x = cl(rand(2, 7, 11, 13)).to(dtype)
    w, b = rand(9, 7, k, k, seed=1).to(dtype), rand(9, seed=2).to(dtype)
    y = cbr.conv_bn_relu_torch(x, w, b, pad, True)
    # bfloat16 only on a CPU with native bf16: elsewhere oneDNN refuses a bf16 conv, the plain path runs
    onednn = ["relu"] if dtype == torch.float32 or native_bf16() else []
    assert calls == onednn
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y, F.conv2d(x, w, b, padding=pad).relu_())
    cbr.conv_bn_relu_torch(x.contiguous(), w, b, pad, True)  # NCHW input: the plain path
    cbr.conv_bn_relu_torch(x, w, b, pad, False)  # no ReLU: the plain path
    assert calls == onednn


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k,pad,relu", [(3, 1, False), (3, 1, True), (1, 0, False), (1, 0, True)])
def test_conv_bn_relu_prepacked_onednn_weight(k: int, pad: int, relu: bool, dtype: torch.dtype) -> None:
    """A weight prepacked in oneDNN's layout (built once, here under inference mode) gives bitwise the
    dense weight's conv (ReLU or not), on odd shapes, also in a later no_grad call and at another input
    size than the one it was packed for; only offered where the oneDNN conv runs."""
    from upernet_fast.kernels._common import onednn_prepacked

    cbr = importlib.import_module("upernet_fast.kernels.conv_bn_relu")
    if cbr._CONV_POINTWISE is None or not torch.backends.mkldnn.is_available():
        pytest.skip("this PyTorch build has no oneDNN pointwise convolution")
    x = cl(rand(2, 7, 11, 13)).to(dtype)
    w, b = rand(9, 7, k, k, seed=1).to(dtype), rand(9, seed=2).to(dtype)
    if dtype == torch.bfloat16 and not native_bf16():
        with torch.no_grad():
            assert not cbr.onednn_weight_useful(x, w, None)  # never offered: oneDNN refuses bf16 convs here
        pytest.skip("no native bf16 on this CPU: oneDNN refuses bf16 convs (checked: never offered)")
    with torch.inference_mode():
        packed = onednn_prepacked(w, x.shape, pad)
        assert packed.layout == torch._mkldnn
        y = cbr.conv_bn_relu_torch(x, w, b, pad, relu, onednn_weight=packed)
    ref = F.conv2d(x, w, b, padding=pad)
    assert torch.equal(y, ref.relu() if relu else ref)
    assert y.is_contiguous(memory_format=torch.channels_last)
    x2 = cl(rand(1, 7, 20, 9, seed=3)).to(dtype)
    with torch.no_grad():
        assert cbr.onednn_weight_useful(x2, w, None)
        y2 = cbr.conv_bn_relu_torch(x2, w, b, pad, relu, onednn_weight=packed)
        ref2 = F.conv2d(x2, w, b, padding=pad)
        assert torch.equal(y2, ref2.relu() if relu else ref2)
        assert not cbr.onednn_weight_useful(x2.contiguous(), w, None)  # NCHW: the plain conv
    assert not cbr.onednn_weight_useful(x2, w, None)  # autograd on


# ------------------------------------------------------------------------------------------------- PPM
POOL_CASES = [
    ((2, 7, 5, 13), (1, 2, 3, 6)),  # overlapping bins, scale > height
    ((1, 3, 16, 16), (1, 2, 3, 6)),  # the real bins at 512x512 input
    ((2, 4, 1, 3), (1, 2, 5)),  # scale > both sides
    ((1, 5, 23, 17), (4, 7)),
    ((1, 2, 290, 310), (1, 2, 3, 6)),  # large map: the separable (not single-GEMM) plan
]


@pytest.mark.parametrize("shape,scales", POOL_CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_adaptive_pool_multi_torch(shape, scales, dtype) -> None:
    x = rand(*shape, dtype=dtype)
    outs = adaptive_pool_multi(x, list(scales))
    assert len(outs) == len(scales)
    for s, y in zip(scales, outs):
        ref64 = F.adaptive_avg_pool2d(x.double(), s)
        assert y.dtype == dtype and y.is_contiguous()
        assert_rule(y, F.adaptive_avg_pool2d(x, s), ref64, f"adaptive_pool_multi s={s}")
    for s, y in zip(scales, adaptive_pool_multi(cl(x), list(scales))):
        assert_rule(
            y, F.adaptive_avg_pool2d(x, s), F.adaptive_avg_pool2d(x.double(), s), f"channels-last s={s}"
        )


# ------------------------------------------------------------------------------------------- FPN ops
@pytest.mark.parametrize("lo_size", [(5, 7), (20, 11), (13, 17)])
def test_topdown_add_torch(lo_size) -> None:
    hi, lo = rand(2, 3, 13, 17), rand(2, 3, *lo_size, seed=1)
    plain = hi + F.interpolate(lo, size=(13, 17), mode="bilinear", align_corners=False)
    assert torch.equal(topdown_add(hi, lo), plain)
    assert torch.equal(topdown_add(cl(hi), cl(lo)), plain)


@pytest.mark.skipif(native.library() is None, reason="C helpers unavailable")
@pytest.mark.parametrize("lo_size", [(7, 9), (13, 17), (4, 3), (20, 30)])
def test_topdown_add_bf16_c_kernel(lo_size) -> None:
    """bf16 channels-last maps take the C top-down add: one rounding, so at least as close to the float64
    result as PyTorch's resize-then-add in bf16 (two roundings), and within bf16 rounding of it."""
    hi, lo = (
        cl(rand(2, 19, 13, 17, dtype=torch.bfloat16)),
        cl(rand(2, 19, *lo_size, seed=1, dtype=torch.bfloat16)),
    )
    assert fpn._topdown_native_possible(hi, lo)
    ref = hi.double() + F.interpolate(lo.double(), size=(13, 17), mode="bilinear", align_corners=False)
    plain = hi + F.interpolate(lo, size=(13, 17), mode="bilinear", align_corners=False)
    y = topdown_add(hi, lo)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    err, plain_err = (y.double() - ref).abs().max().item(), (plain.double() - ref).abs().max().item()
    assert err <= plain_err and err <= 2**-8 * ref.abs().max().item(), (err, plain_err)
    # one rounding: every element is the float64 result rounded to bf16, up to a last-bit tie
    assert ((y.double() - ref.to(torch.bfloat16).double()).abs() <= 2**-7 * ref.abs()).all()


def test_conv3x3_taps_weight_order() -> None:
    w = rand(4, 3, 3, 3)
    t = conv3x3_taps_weight(w)
    assert t.shape == (36, 3, 1, 1)
    for ky in range(3):
        for kx in range(3):
            assert torch.equal(t[(ky * 3 + kx) * 4 : (ky * 3 + kx + 1) * 4, :, 0, 0], w[:, :, ky, kx])


USA_CASES = [((7, 9), (29, 35)), ((16, 16), (128, 128)), ((3, 5), (17, 13)), ((9, 11), (5, 7)), ((1, 1), (3, 4)),
             ((6, 4), (6, 4))]  # fmt: skip


def taps_and_ref(h: int, w: int, size, dtype=torch.float64, layout: str = "nchw", B: int = 2):
    x, wt = rand(B, 6, h, w, dtype=dtype), rand(5, 6, 3, 3, dtype=dtype, seed=1) / 4
    if layout == "cl":
        x = cl(x)
    taps = F.conv2d(x, conv3x3_taps_weight(wt))  # (B, 9*C, h, w) in the layout of x
    ref = F.conv2d(F.interpolate(x, size=size, mode="bilinear", align_corners=False), wt, padding=1)
    return taps, ref, x, wt


@pytest.mark.parametrize("src,size", USA_CASES)
@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_upsample_shift_add_is_conv_of_upsample_fp64(src, size, layout) -> None:
    taps, ref, _, _ = taps_and_ref(*src, size, layout=layout)
    scale = ref.abs().max().item()
    assert_close(upsample_shift_add(taps, size), ref, 1e-13 * scale, "fresh output")
    assert_close(upsample_shift_add(taps.unflatten(1, (9, 5)), size), ref, 1e-13 * scale, "5-D taps")
    for out_layout in ("nchw", "cl"):
        out = torch.full_like(ref, 0.5)
        out = cl(out) if out_layout == "cl" else out
        got = upsample_shift_add(taps, size, out=out)
        assert got is out
        assert_close(out - 0.5, ref, 1e-13 * scale, f"accumulate into {out_layout} out")


@pytest.mark.skipif(native.library() is None, reason="C helpers unavailable")
@pytest.mark.parametrize("src,size", USA_CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_upsample_shift_add_c_kernel(src, size, dtype) -> None:
    """csrc/usa.c (what channels-last float32/bf16 taps take) on exactly representable inputs: it must
    match the float64 identity to float32 rounding, fresh and accumulating, whatever the scale (down- and
    same-size included)."""
    taps, _, _, _ = taps_and_ref(*src, size, layout="cl")
    taps = cl(taps.to(dtype))  # the values the kernel reads, exactly
    ref = upsample_shift_add(cl(taps.double()), size)
    scale = ref.abs().max().item()
    out = cl(torch.full(ref.shape, 0.5))
    fpn._usa_native(taps.unflatten(1, (9, 5)), out, accumulate=True)
    assert_close(out.double() - 0.5, ref, 1e-6 * scale, "accumulate")
    fresh = cl(torch.full(ref.shape, float("nan")))
    fpn._usa_native(taps.unflatten(1, (9, 5)), fresh, accumulate=False)
    assert_close(fresh.double(), ref, 1e-6 * scale, "fresh")
    assert fpn._usa_native_possible(taps.unflatten(1, (9, 5)), out)  # the public op takes the C kernel
    op = upsample_shift_add(taps, size, out=cl(torch.zeros(ref.shape)))
    assert_close(op.double(), ref, 1e-6 * scale, "op")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layout", ["nchw", "cl"])
def test_upsample_shift_add_low_precision(dtype, layout) -> None:
    size = (29, 35)
    taps, ref, x, wt = taps_and_ref(7, 9, size, layout=layout)
    # PyTorch's own error: the unfused composition in `dtype` (fp16 convs run in fp32 on CPU, then round).
    xd, wd = x.to(dtype), wt.to(dtype)
    up = F.interpolate(xd, size=size, mode="bilinear", align_corners=False)
    plain = (
        F.conv2d(up.float(), wd.float(), padding=1).to(dtype)
        if dtype == torch.float16
        else F.conv2d(up, wd, padding=1)
    )
    y = upsample_shift_add(taps.to(dtype), size)
    assert y.dtype == dtype
    assert_rule(y, plain, ref, "upsample_shift_add")
    # Several pyramid levels accumulating into one float32 buffer.
    taps2, ref2, _, _ = taps_and_ref(3, 5, size, layout=layout)
    out = torch.zeros(ref.shape, dtype=dtype)
    upsample_shift_add(taps.to(dtype), size, out=out)
    upsample_shift_add(taps2.to(dtype), size, out=out)
    assert_close(
        out, ref + ref2, 2 * (FACTOR * (plain.double() - ref).abs().max().item() + ATOL[dtype]), "two levels"
    )


# ---------------------------------------------------------------------------------- upsample_shift_add_sum
def usa_sum_ref(base: torch.Tensor, taps: list[torch.Tensor], relu: bool) -> torch.Tensor:
    """The definition in float64, from pieces tested above: base + each group's shift-add, then ReLU."""
    out = base.double() + sum(upsample_shift_add(t.double(), base.shape[2:]) for t in taps)
    return out.clamp_min(0) if relu else out


@pytest.mark.parametrize("layout", ["nchw", "cl"])
@pytest.mark.parametrize("relu", [False, True])
def test_upsample_shift_add_sum_is_bottleneck_fp64(layout, relu) -> None:
    """relu(base + conv3x3(cat(upsampled groups))) with the conv split per group: the identity the decode
    head's bottlenecks rely on, against F.interpolate + F.conv2d in float64."""
    size, srcs = (29, 35), [(7, 9), (3, 5), (29, 35)]
    xs = [rand(2, 4, *s, dtype=torch.float64, seed=i) for i, s in enumerate(srcs)]
    wts = [rand(5, 4, 3, 3, dtype=torch.float64, seed=10 + i) / 4 for i in range(len(srcs))]
    base = rand(2, 5, *size, dtype=torch.float64, seed=20)
    if layout == "cl":
        xs, base = [cl(x) for x in xs], cl(base)
    taps = [F.conv2d(x, conv3x3_taps_weight(w)) for x, w in zip(xs, wts, strict=True)]
    up = torch.cat([F.interpolate(x, size=size, mode="bilinear", align_corners=False) for x in xs], 1)
    ref = base + F.conv2d(up, torch.cat(wts, 1), padding=1)
    ref = F.relu(ref) if relu else ref
    got = fpn.upsample_shift_add_sum(base, taps, relu)
    assert got.dtype == torch.float64 and got.shape == ref.shape
    assert_close(got, ref, 1e-13 * ref.abs().max().item(), "upsample_shift_add_sum")
    assert_close(fpn.upsample_shift_add_sum(base, [], relu), F.relu(base) if relu else base, 0.0, "no groups")


SUM_CASES = [  # (B, C, (H, W), group sizes): C = 72 runs a vector chunk of 64 and a scalar tail
    (1, 72, (29, 35), [(7, 9), (15, 18), (29, 35)]),
    (2, 5, (17, 13), [(3, 5), (9, 11)]),
    (1, 64, (16, 16), [(8, 8), (4, 4), (2, 2), (1, 1)]),
    (2, 3, (5, 7), [(9, 11)]),  # downsampling
]


@pytest.mark.skipif(native.library() is None, reason="C helpers unavailable")
@pytest.mark.parametrize("B,C,size,srcs", SUM_CASES)
@pytest.mark.parametrize("base_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("taps_dtype", [torch.bfloat16, torch.float32])
def test_upsample_shift_add_sum_c_kernel(B, C, size, srcs, base_dtype, taps_dtype) -> None:
    """csrc/usa.c's one-pass sum (channels-last CPU maps take it) on exactly representable inputs: within
    float32 rounding of the float64 definition, with and without the ReLU, NaN propagated as F.relu does."""
    base = cl(rand(B, C, *size, seed=1).to(base_dtype))
    base[0, 0, 0, 0] = float("nan")
    taps = [cl(rand(B, 9 * C, *s, seed=2 + i).to(taps_dtype)) for i, s in enumerate(srcs)]
    assert fpn._usa_sum_native_possible(base, fpn._check_usa_sum(base, taps))
    for relu in (False, True):
        ref = usa_sum_ref(base, taps, relu)
        got = fpn.upsample_shift_add_sum(base, taps, relu)
        assert got.dtype == torch.float32 and got.is_contiguous(memory_format=torch.channels_last)
        assert torch.isnan(got[0, 0, 0, 0])
        got[0, 0, 0, 0] = ref[0, 0, 0, 0] = 0.0
        assert_close(got, ref, 1e-6 * ref.abs().max().item(), f"relu={relu}")
        if relu:
            assert (got >= 0).all()


def test_upsample_shift_add_sum_errors() -> None:
    base = rand(1, 4, 9, 9)
    for h, w in ((0, 3), (3, 0)):  # an empty low-resolution map (the C kernel would read before its data)
        empty = cl(rand(1, 9 * 4, h, w))
        with pytest.raises(ValueError, match="both need at least 1 px"):
            fpn.upsample_shift_add_sum(cl(base), [empty])
        with pytest.raises(ValueError, match="both need at least 1 px"):
            upsample_shift_add(empty, (9, 9), out=cl(torch.zeros(1, 4, 9, 9)))
    with pytest.raises(ValueError, match="do not match the base"):
        fpn.upsample_shift_add_sum(base, [rand(1, 9 * 3, 4, 4)])
    with pytest.raises(ValueError, match="expected an NCHW base"):
        fpn.upsample_shift_add_sum(rand(4, 9, 9), [rand(1, 9 * 4, 4, 4)])


# ------------------------------------------------------------------------------------------------ resize
@pytest.mark.parametrize("size", [(29, 35), (3, 4), (13, 17), (1, 1), (52, 68), (40, 171)])
def test_resize_bilinear_torch(size) -> None:
    """float32 NCHW runs the C separable resize (kernels/csrc/resize.c): ATen's sampling positions and
    weights, another summation order, so within about an ulp of F.interpolate (a wrong index or weight
    would be off by O(1)). Channels-last and float64 inputs stay on F.interpolate."""
    from upernet_fast.kernels import native

    x = rand(2, 3, 13, 17)
    plain = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    y = resize_bilinear(x, size)
    assert y.is_contiguous() and y.dtype == torch.float32
    assert_close(y, plain, 4 * torch.finfo(torch.float32).eps * x.abs().max().item(), "resize_bilinear")
    if native.library() is None:
        pytest.fail("the native CPU helpers did not build (see the RuntimeWarning)")
    assert torch.equal(resize_bilinear(cl(x), size), plain)  # channels-last in and out: F.interpolate
    assert resize_bilinear(cl(x), size).is_contiguous(memory_format=torch.channels_last)
    x64 = x.double()
    assert torch.equal(
        resize_bilinear(x64, size), F.interpolate(x64, size=size, mode="bilinear", align_corners=False)
    )


def test_resize_bilinear_strided_input_and_one_thread() -> None:
    from upernet_fast.kernels.resize import _resize_bilinear_native

    x = rand(2, 40, 9, 11)[:, ::3]  # strided channels
    plain = F.interpolate(x, size=(33, 21), mode="bilinear", align_corners=False)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = _resize_bilinear_native(x, 33, 21)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, _resize_bilinear_native(x, 33, 21))
    assert_close(single, plain, 8 * torch.finfo(torch.float32).eps * x.abs().max().item(), "strided input")


def assert_argmax_ok(labels: torch.Tensor, logits: torch.Tensor, tol: float, what: str) -> None:
    """Labels must equal argmax(logits) except at near-ties, where the chosen logit is within tol of the max."""
    ref = logits.argmax(1)
    diff = labels != ref
    if diff.any():
        chosen = logits.gather(1, labels.unsqueeze(1)).squeeze(1)
        gap = (logits.amax(1) - chosen)[diff]
        assert gap.max().item() <= tol, (
            f"{what}: {int(diff.sum())} labels differ, worst logit gap {gap.max().item():.3g} at "
            f"{tuple(int(i) for i in diff.nonzero()[gap.argmax()])}"
        )


@pytest.mark.parametrize("size", [(29, 35), (6, 5), (64, 48), (26, 51), (39, 17)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_resize_argmax_torch(size, dtype) -> None:
    x = rand(2, 11, 13, 17, dtype=dtype)
    plain = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    y = resize_argmax(x, size)
    assert y.dtype == torch.int64 and y.shape == (2, *size)
    tol = 4 * torch.finfo(dtype).eps * plain.abs().max().item()  # near-ties within rounding may differ
    assert_argmax_ok(y, plain.double(), tol, "resize_argmax")
    # Many blocks (crop blocks where the ratio allows, else row gathers) and the gather path alone.
    assert_argmax_ok(
        resize_argmax_torch(x, list(size), target_bytes=1 << 12), plain.double(), tol, "small blocks"
    )
    assert_argmax_ok(resize_argmax_torch(x, list(size), block_bytes=1), plain.double(), tol, "gather path")
    assert_argmax_ok(resize_argmax(cl(x), size), plain.double(), tol, "channels-last input")


def test_resize_argmax_ties_and_nan() -> None:
    x = rand(1, 5, 6, 7)
    x[:, 3] = x[:, 1] = x.amax(1) + 1  # exact tie everywhere between channels 1 and 3
    assert (resize_argmax(x, (11, 9)) == 1).all()
    x[0, 4, 2, 3] = float("nan")
    y = resize_argmax(x, (11, 9))
    assert torch.equal(y, F.interpolate(x, size=(11, 9), mode="bilinear", align_corners=False).argmax(1))


# ------------------------------------------------------------------------------------------ torch.compile
def test_compile_fullgraph_matches_eager() -> None:
    """One compiled graph through every registered op (custom ops are opaque to Inductor: no breaks)."""
    x, w, b = rand(1, 4, 6, 7), rand(5, 4, 3, 3, seed=1), rand(5, seed=2)
    taps = rand(1, 45, 3, 4, seed=3)
    lo = rand(1, 5, 3, 4, seed=4)

    def fn(x, w, b, taps, lo):
        y = conv_bn_relu(x, w, b, 1, True)
        pooled = adaptive_pool_multi(y, [1, 2, 3])
        y = topdown_add(y, lo)
        acc = y.clone()
        upsample_shift_add(taps, (6, 7), out=acc)  # the mutating variant
        fresh = upsample_shift_add(taps, (6, 7))
        big = resize_bilinear(acc, (9, 11))
        labels = resize_argmax(acc + fresh, (9, 11))
        return (*pooled, y, acc, fresh, big, labels)

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    for got, want in zip(compiled(x, w, b, taps, lo), fn(x, w, b, taps, lo)):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert_close(got, want, 1e-5, "compiled vs eager")


# ------------------------------------------------------------------------------------------------ dispatch
def test_dispatch_auto_on_cpu_is_torch(monkeypatch) -> None:
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    assert dispatch.resolve_backend("auto", "cpu") == "torch"
    assert dispatch.resolve_backend(None, torch.device("cpu")) == "torch"
    assert dispatch.resolve_backend("torch", "cuda") == "torch"
    ops = dispatch.ops_for("auto", "cpu")
    assert all(ops.backend_of(name) == "torch" for name in dispatch.OPS)
    x = rand(1, 2, 3, 4)
    assert torch.equal(ops.resize_bilinear(x, (5, 6)), resize_bilinear(x, (5, 6)))


def test_dispatch_triton_on_cpu_needs_interpreter(monkeypatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        dispatch.resolve_backend("triton", "cpu")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        dispatch.ops_for("triton", "cpu")
    # The launchers check too, for direct callers of the kernel layer.
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        resize_bilinear(rand(1, 1, 2, 2), (3, 3), backend="triton")


def test_dispatch_env_var(monkeypatch) -> None:
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    assert dispatch.default_backend() == "torch"
    assert dispatch.resolve_backend(None, "cuda") == "torch"  # env says torch even for CUDA tensors
    monkeypatch.setenv(dispatch.ENV_VAR, "tpu")
    with pytest.raises(ValueError, match="auto, triton, torch"):
        dispatch.resolve_backend(None, "cpu")


def test_dispatch_bad_names() -> None:
    with pytest.raises(ValueError, match="valid choices: auto, triton, torch"):
        dispatch.resolve_backend("cuda", "cpu")
    with pytest.raises(ValueError, match="conv_bn_relu"):
        dispatch.get_op("conv", "torch")
    with pytest.raises(ValueError, match="valid choices"):
        dispatch.ops_for("torch", "cpu", overrides={"resize": "torch"})
    with pytest.raises(ValueError, match="valid choices"):
        with dispatch.override(resize_argmax="gpu"):
            pass
    with pytest.raises(AttributeError, match="valid ops"):
        dispatch.ops_for("torch", "cpu").no_such_op  # noqa: B018


def test_dispatch_override(monkeypatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    ops = dispatch.ops_for("torch", "cpu", overrides={"resize_argmax": "auto"})
    assert ops.backend_of("resize_argmax") == "torch"
    with dispatch.override(conv_bn_relu="triton"):
        # resolved lazily: the forced op now needs the interpreter, the others are untouched
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            ops.conv_bn_relu  # noqa: B018
        assert ops.backend_of("topdown_add") == "torch"
        with dispatch.override({"conv_bn_relu": "torch"}):
            assert ops.backend_of("conv_bn_relu") == "torch"
    assert ops.backend_of("conv_bn_relu") == "torch"
    f = dispatch.get_op("upsample_shift_add", "torch")
    taps, ref, _, _ = taps_and_ref(3, 4, (5, 6))
    assert_close(f(taps, (5, 6)), ref, 1e-12, "get_op")


def test_dispatch_traces_under_compile() -> None:
    """The model resolves ops inside forward: dispatch itself must not break a fullgraph trace."""
    x, w, b = rand(1, 4, 6, 7), rand(5, 4, 3, 3, seed=1), rand(5, seed=2)

    def fn(x):
        ops = dispatch.ops_for(None, x.device)
        y = ops.conv_bn_relu(x, w, b, 1, True)
        return dispatch.get_op("resize_bilinear", "auto", x.device)(y, (9, 8))

    torch._dynamo.reset()
    assert_close(torch.compile(fn, fullgraph=True, backend="eager")(x), fn(x), 0.0, "dispatch under compile")


# ------------------------------------------------------------------------------ large CPU output buffers
def test_conv_bn_relu_1x1_gemm_path() -> None:
    """Large 1x1 convs on channels-last input run as one MKL GEMM into a huge-page buffer (odd sizes)."""
    from upernet_fast.kernels.conv_bn_relu import gemm_by_default

    x, w, b = cl(rand(1, 96, 67, 131)), rand(300, 96, 1, 1, seed=1), rand(300, seed=2)
    assert gemm_by_default(x, w), "this case must take the GEMM path"
    assert not gemm_by_default(x.contiguous(), w) and not gemm_by_default(x, w[:150])
    for bias in (b, None):
        for relu in (False, True):
            y = conv_bn_relu(x, w, bias, 0, relu)
            plain = F.conv2d(x, w, bias)
            ref64 = F.conv2d(x.double(), w.double(), None if bias is None else bias.double())
            if relu:
                plain, ref64 = F.relu(plain), F.relu(ref64)
            assert y.is_contiguous(memory_format=torch.channels_last)
            assert_rule(y, plain, ref64, f"1x1 GEMM path (bias={bias is not None}, relu={relu})")


@pytest.mark.parametrize("shape", [(1, 1, 8, 9), (2, 5, 1, 1), (1, 1, 1, 1), (2, 16, 5, 7)])
@pytest.mark.parametrize("gemm", [True, False, None])
def test_conv_bn_relu_1x1_strides_match_its_fake(shape, gemm) -> None:
    """The registered fake (what torch.compile plans with) and the real op agree on the output's strides,
    also where a tensor is contiguous and channels-last at once (Cin = 1, H = W = 1), which the GEMM path
    accepts; the values are F.conv2d's."""
    from upernet_fast.kernels.conv_bn_relu import _fake

    x, w, b = cl(rand(*shape)), rand(6, shape[1], 1, 1, seed=1), rand(6, seed=2)
    y = conv_bn_relu(x, w, b, 0, True, gemm=gemm)
    fake = _fake("torch")(x, w, b, 0, True, None, gemm)
    significant = lambda t: [st for st, n in zip(t.stride(), t.shape, strict=True) if n > 1]  # noqa: E731
    assert y.shape == fake.shape and significant(y) == significant(fake), (y.stride(), fake.stride())
    plain, ref64 = F.relu(F.conv2d(x, w, b)), F.relu(F.conv2d(x.double(), w.double(), b.double()))
    assert_rule(y, plain, ref64, f"1x1 {shape} gemm={gemm}")


def _smaps_entry(t: torch.Tensor) -> dict[str, str]:
    """The /proc/self/smaps fields of the mapping holding the middle of ``t``'s storage (the advice splits
    the mapping at the 2 MiB boundaries)."""
    addr = t.untyped_storage().data_ptr() + t.untyped_storage().nbytes() // 2
    fields: dict[str, str] | None = None
    with open("/proc/self/smaps") as f:
        for line in f:
            key, _, value = line.partition(" ")
            if not key.endswith(":"):  # a mapping's header line: "lo-hi perms ..."
                if fields is not None:
                    return fields
                lo, hi = (int(v, 16) for v in key.split("-"))
                fields = {} if lo <= addr < hi else None
            elif fields is not None:
                fields[key[:-1]] = value.strip()
    assert fields is not None, "storage not found in /proc/self/smaps"
    return fields


def test_large_outputs_are_huge_page_backed(monkeypatch) -> None:
    """The ops' large CPU outputs are advised MADV_HUGEPAGE before first touch (kernels/_memory.py), so
    writing fresh memory takes one fault per 2 MiB; the values are those of the plain ops. (Buffer cache
    off: this is about fresh memory; a cached buffer is advised once, when it is first allocated.)"""
    from upernet_fast.kernels import _memory

    monkeypatch.setattr(_memory, "_cache_enabled", False)

    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = f.read()
    except OSError:
        pytest.skip("no transparent huge pages on this system")
    if _memory._madvise is None or "[never]" in mode:
        pytest.skip(f"huge pages unavailable here (THP mode: {mode.strip()})")
    x = rand(1, 19, 48, 64)
    y = resize_bilinear(x, (480, 640))  # 23 MB
    plain = F.interpolate(x, size=(480, 640), mode="bilinear", align_corners=False)
    assert_close(y, plain, 8 * torch.finfo(torch.float32).eps * x.abs().max().item(), "large resize")
    hi, lo = rand(1, 40, 300, 257, seed=1), rand(1, 40, 75, 65, seed=2)
    up = topdown_add(hi, lo)
    assert torch.equal(up, hi + F.interpolate(lo, size=(300, 257), mode="bilinear", align_corners=False))
    for t in (y, up):  # advised ("hg"), whether the memory came fresh from mmap or back from the heap
        assert "hg" in _smaps_entry(t)["VmFlags"].split()
    # Above glibc's largest mmap threshold (32 MiB) the buffer is always a fresh mapping, so it gets huge
    # pages (the kernel may fall back to small ones when it has no free 2 MiB block at hand: 3 tries).
    entries = []
    for _ in range(3):
        big = _memory.empty_output((40 * 2**20 // 4,), dtype=torch.float32, device="cpu").fill_(1.0)
        entries.append(_smaps_entry(big))
        if int(entries[-1]["AnonHugePages"].split()[0]) >= 2048:
            break
    else:
        # The advice itself ("hg") is asserted above; whether the kernel backs it is the host's business
        # (seen: THP "madvise" mode with AnonHugePages 0 system-wide on some VMs of this project's kind).
        pytest.skip(f"the kernel gave no huge pages to an advised fresh 40 MiB mapping: {entries[-1]}")


@pytest.mark.parametrize("with_bias", [True, False])
def test_conv1x1_to_nchw_matches_conv2d(with_bias) -> None:
    """The classifier's NCHW-output GEMM: F.conv2d's values (float32 GEMM rounding) on a channels-last
    batch of odd size, written as contiguous NCHW; only taken in eager float32 inference."""
    from upernet_fast.kernels.conv_bn_relu import conv1x1_nchw_possible, conv1x1_to_nchw

    x = cl(rand(2, 37, 13, 17))
    w, b = rand(11, 37, 1, 1), (rand(11) if with_bias else None)
    ref = F.conv2d(x.double(), w.double(), None if b is None else b.double())
    with torch.no_grad():
        assert conv1x1_nchw_possible(x, w)
        y = conv1x1_to_nchw(x, w, b)
    assert y.is_contiguous() and y.shape == ref.shape
    assert_close(y, ref.float(), 1e-5 * ref.abs().max().item(), "conv1x1_to_nchw")
    assert not conv1x1_nchw_possible(x, w)  # autograd on: the plain conv
    with torch.no_grad():
        assert not conv1x1_nchw_possible(x.contiguous(), w)  # NCHW input
        assert not conv1x1_nchw_possible(x.double(), w.double())


@pytest.mark.parametrize("k,pad,winograd", [(3, 1, True), (3, 1, False), (1, 0, False)])
def test_conv_bn_relu_with_low_is_the_conv_of_the_topdown_sum(k, pad, winograd) -> None:
    """conv_bn_relu(x, ..., low=low) = conv_bn_relu(topdown_add(x, low), ...) on every PyTorch path (the
    Winograd transform forms the sum in its gather; the others add first), odd sizes."""
    from upernet_fast.kernels.winograd import winograd_weight

    x = cl(rand(2, 9, 13, 11))
    low = cl(rand(2, 9, 7, 6, seed=3))
    w, b = rand(5, 9, k, k, seed=1), rand(5, seed=2)
    wino = winograd_weight(w, 6) if winograd else None
    with torch.no_grad():
        y = conv_bn_relu(x, w, b, pad, True, wino, low=low)
        ref = conv_bn_relu(topdown_add(x, low), w, b, pad, True, wino)
    assert_close(y, ref, 2e-5 * ref.abs().max().item(), "conv_bn_relu(low=)")
    with pytest.raises(ValueError, match="low must be"):
        conv_bn_relu(x, w, b, pad, True, wino, low=low[:, :4])
