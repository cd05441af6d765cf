"""Triton kernels (kernels/) against their PyTorch paths and against the plain PyTorch compositions they
replace, on odd shapes, float32 and float16.

Runs on CUDA when present, else in Triton's interpreter on CPU tensors. The interpreter decides when the
kernels are decorated, so CI runs this module in its own process:

    TRITON_INTERPRET=1 python -m pytest -m interpret

Tolerance rule (table below): per element, |kernel - float64 reference| <= FACTOR x (PyTorch's own max error
in the same dtype) + ATOL[op][dtype]. "PyTorch's own" is the unfused composition run in that dtype (float16
convolutions on CPU accumulate in float32 and round once, like the kernel). The kernels accumulate in fp32.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.interpret

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip(
        "Triton kernels need CUDA or the Triton interpreter: run `TRITON_INTERPRET=1 python -m pytest -m interpret`"
        " (the variable must be set before triton is imported)",
        allow_module_level=True,
    )
triton = pytest.importorskip("triton", reason="the Triton backend needs the `triton` package")

from upernet_fast.kernels import _common  # noqa: E402
from upernet_fast.kernels.conv_bn_relu import conv_bn_relu_torch, conv_bn_relu_triton  # noqa: E402
from upernet_fast.kernels.fpn import (  # noqa: E402
    conv3x3_taps_weight,
    topdown_add_torch,
    topdown_add_triton,
    upsample_shift_add,
    upsample_shift_add_sum_torch,
    upsample_shift_add_sum_triton,
    upsample_shift_add_torch,
    upsample_shift_add_triton,
)
from upernet_fast.kernels.ppm import adaptive_pool_multi_torch, adaptive_pool_multi_triton  # noqa: E402
from upernet_fast.kernels.resize import (  # noqa: E402
    resize_argmax,
    resize_argmax_torch,
    resize_argmax_triton,
    resize_bilinear_torch,
    resize_bilinear_triton,
)

if INTERPRET and not _common.kernels_interpreted():
    pytest.skip(
        "TRITON_INTERPRET=1 was set after upernet_fast.kernels was imported in this process; run this module "
        "in its own process (`TRITON_INTERPRET=1 python -m pytest -m interpret`)",
        allow_module_level=True,
    )

DEVICE = "cpu" if INTERPRET else "cuda"
DTYPES = [torch.float32, torch.float16]
FACTOR = 2.0
# Absolute slack on top of FACTOR x PyTorch's own error, per op and dtype.
ATOL = {
    "conv_bn_relu": {torch.float32: 1e-5, torch.float16: 2e-3},
    "adaptive_pool_multi": {torch.float32: 1e-6, torch.float16: 1e-3},
    "topdown_add": {torch.float32: 1e-6, torch.float16: 1e-3},
    "upsample_shift_add": {torch.float32: 1e-5, torch.float16: 2e-3},
    "resize_bilinear": {torch.float32: 1e-6, torch.float16: 1e-3},
}
MAX_ERR: dict[tuple[str, str], float] = {}  # filled as tests run, printed at the end (pytest -s)


def rand(*shape: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=DEVICE)


def cl(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, what: str) -> None:
    """Elementwise |actual - expected| <= atol, reporting count, max error and worst index."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual.double() - expected.double()).abs().cpu()
    bad = ~(diff <= atol)
    if bad.any():
        worst = tuple(
            int(i) for i in torch.unravel_index(torch.nan_to_num(diff, nan=float("inf")).argmax(), diff.shape)
        )
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {diff.numel()} elements differ by more than {atol:.3g}; "
            f"max error {diff.max().item():.3g} at {worst}: got {actual[worst].item():.8g}, "
            f"expected {expected[worst].item():.8g}"
        )


def check(
    op: str, kernel: torch.Tensor, torch_path: torch.Tensor, plain: torch.Tensor, ref64: torch.Tensor
) -> None:
    """Kernel vs the float64 reference under the rule, and vs our PyTorch path within the two bounds."""
    dtype = kernel.dtype
    assert kernel.dtype == plain.dtype and kernel.shape == plain.shape
    own = (plain.double() - ref64).abs().max().item()
    bound = FACTOR * own + ATOL[op][dtype]
    assert_close(
        kernel, ref64, bound, f"{op} triton vs float64 reference ({dtype}, PyTorch's own error {own:.3g})"
    )
    assert_close(kernel, torch_path, 2 * bound, f"{op} triton vs its PyTorch path ({dtype})")
    err = (kernel.double() - ref64).abs().max().item()
    key = (op, str(dtype).replace("torch.", ""))
    MAX_ERR[key] = max(MAX_ERR.get(key, 0.0), err)


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    for (op, dt), err in sorted(MAX_ERR.items()):
        print(f"max |triton - fp64 reference|  {op:22s} {dt:8s} {err:.3g}")


# ------------------------------------------------------------------------------------------ conv_bn_relu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape,c_out,k,pad,relu,layout",
    [
        (
            (2, 37, 9, 11),
            70,
            3,
            1,
            True,
            "nchw",
        ),  # in/out channels not multiples of the blocks, ragged pixels
        ((1, 20, 7, 5), 19, 1, 0, False, "cl"),
        ((1, 33, 6, 13), 17, 3, 0, True, "nchw"),  # valid (unpadded) 3x3
    ],
)
def test_conv_bn_relu(dtype, shape, c_out, k, pad, relu, layout) -> None:
    x, w, b = (
        rand(*shape, dtype=dtype),
        rand(c_out, shape[1], k, k, dtype=dtype, seed=1) / 3,
        rand(c_out, seed=2),
    )
    x = cl(x) if layout == "cl" else x
    y = conv_bn_relu_triton(x, w, b.to(dtype), pad, relu)
    ref64 = F.conv2d(x.double(), w.double(), b.to(dtype).double(), padding=pad)
    plain = F.conv2d(x, w, b.to(dtype), padding=pad)
    if relu:
        ref64, plain = F.relu(ref64), F.relu(plain)
    assert y.is_contiguous(memory_format=torch.channels_last if layout == "cl" else torch.contiguous_format)
    check("conv_bn_relu", y, conv_bn_relu_torch(x, w, b.to(dtype), pad, relu), plain, ref64)


# ------------------------------------------------------------------------------------------------- PPM
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape,scales",
    [
        ((2, 7, 5, 13), (1, 2, 3, 6)),  # overlapping bins, scale > height
        ((1, 40, 16, 16), (1, 2, 3, 6)),  # more rows than one block
        ((2, 3, 1, 3), (1, 2, 5)),  # scale > both sides
        ((1, 2, 9, 9), tuple(range(1, 13))),  # more bins (650) than one column block
    ],
)
def test_adaptive_pool_multi(dtype, shape, scales) -> None:
    x = rand(*shape, dtype=dtype)
    if shape[1] == 40:
        x = cl(x)
    outs = adaptive_pool_multi_triton(x, list(scales))
    ours = adaptive_pool_multi_torch(x, list(scales))
    for s, y, t in zip(scales, outs, ours):
        assert y.shape == (shape[0], shape[1], s, s) and y.is_contiguous()
        check("adaptive_pool_multi", y, t, F.adaptive_avg_pool2d(x, s), F.adaptive_avg_pool2d(x.double(), s))


# ------------------------------------------------------------------------------------------- FPN ops
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lo_size", [(5, 7), (20, 11)])  # up and down
def test_topdown_add(dtype, lo_size) -> None:
    hi, lo = rand(2, 3, 13, 17, dtype=dtype), rand(2, 3, *lo_size, dtype=dtype, seed=1)
    ref64 = hi.double() + F.interpolate(lo.double(), size=(13, 17), mode="bilinear", align_corners=False)
    plain = hi + F.interpolate(lo, size=(13, 17), mode="bilinear", align_corners=False)
    check("topdown_add", topdown_add_triton(hi, lo), topdown_add_torch(hi, lo), plain, ref64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "src,size,layout",
    [
        ((7, 9), (29, 35), "nchw"),
        ((16, 16), (128, 128), "cl"),
        ((3, 5), (17, 13), "nchw"),
        ((9, 11), (5, 7), "cl"),
    ],
)
def test_upsample_shift_add(dtype, src, size, layout) -> None:
    B, C = (1, 1) if size == (128, 128) else (2, 3)  # the interpreter runs ~0.1 s per program: keep it small
    x, wt = rand(B, 4, *src, dtype=dtype), rand(C, 4, 3, 3, dtype=dtype, seed=1) / 3
    x = cl(x) if layout == "cl" else x
    # taps in float32 from the same dtype-rounded inputs, then rounded: what a model in `dtype` would feed
    taps = F.conv2d(x.float(), conv3x3_taps_weight(wt.float())).to(dtype)
    ref64 = F.conv2d(
        F.interpolate(x.double(), size=size, mode="bilinear", align_corners=False), wt.double(), padding=1
    )
    up = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    plain = (
        F.conv2d(up.float(), wt.float(), padding=1).to(dtype)
        if dtype == torch.float16
        else F.conv2d(up, wt, padding=1)
    )
    y = upsample_shift_add_triton(taps, size)
    check("upsample_shift_add", y, upsample_shift_add_torch(taps, size), plain, ref64)
    # accumulate into an existing buffer (several pyramid levels share one output)
    out = torch.full(ref64.shape, 0.25, dtype=dtype, device=DEVICE)
    upsample_shift_add(taps, size, out=out, backend="triton")
    check("upsample_shift_add", out, upsample_shift_add_torch(taps, size) + 0.25, plain + 0.25, ref64 + 0.25)


@pytest.mark.parametrize("dtype", DTYPES)
def test_upsample_shift_add_sum(dtype) -> None:
    """The bottleneck tail: base + both groups' shift-adds + ReLU, float32 out (Triton composes its own
    shift-add kernel; the PyTorch path on CPU is the one-pass C sum for float32)."""
    size, srcs = (13, 11), [(4, 3), (7, 6)]
    xs = [cl(rand(1, 4, *s, dtype=dtype, seed=i)) for i, s in enumerate(srcs)]
    wts = [rand(3, 4, 3, 3, dtype=dtype, seed=5 + i) / 3 for i in range(len(srcs))]
    base = cl(rand(1, 3, *size, dtype=dtype, seed=9))
    taps = [
        F.conv2d(x.float(), conv3x3_taps_weight(w.float())).to(dtype) for x, w in zip(xs, wts, strict=True)
    ]
    up = torch.cat(
        [F.interpolate(x.double(), size=size, mode="bilinear", align_corners=False) for x in xs], 1
    )
    ref = F.relu(base.double() + F.conv2d(up, torch.cat(wts, 1).double(), padding=1))
    got = upsample_shift_add_sum_triton(base, taps, True)
    want = upsample_shift_add_sum_torch(base, taps, True)
    assert got.dtype == want.dtype == torch.float32
    # both sum the same rounded taps in float32: they agree to float32 rounding; the float64 reference
    # differs by the taps' rounding (float16: ~3 significant digits)
    scale = ref.abs().max().item()
    assert_close(got, want, 1e-5 * scale, "triton vs torch")
    assert_close(got, ref, (1e-5 if dtype == torch.float32 else 5e-3) * scale, "triton vs float64")


# ------------------------------------------------------------------------------------------------ resize
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", [(29, 35), (6, 5), (13, 17)])
def test_resize_bilinear(dtype, size) -> None:
    x = rand(2, 3, 13, 17, dtype=dtype)
    ref64 = F.interpolate(x.double(), size=size, mode="bilinear", align_corners=False)
    plain = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    check("resize_bilinear", resize_bilinear_triton(x, size), resize_bilinear_torch(x, size), plain, ref64)
    check(
        "resize_bilinear", resize_bilinear_triton(cl(x), size), resize_bilinear_torch(x, size), plain, ref64
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", [(29, 35), (6, 5)])
def test_resize_argmax(dtype, size) -> None:
    x = rand(2, 11, 13, 17, dtype=dtype)
    y = resize_argmax_triton(x, size)
    assert y.dtype == torch.int64 and y.shape == (2, *size)
    logits = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    for other, name in (
        (logits.argmax(1), "interpolate+argmax"),
        (resize_argmax_torch(x, list(size)), "torch path"),
    ):
        diff = y != other
        if diff.any():  # only near-ties may differ: the chosen logit must be within rounding of the max
            ref64 = F.interpolate(x.double(), size=size, mode="bilinear", align_corners=False)
            gap = (ref64.amax(1) - ref64.gather(1, y.unsqueeze(1)).squeeze(1))[diff]
            tol = 4 * torch.finfo(dtype).eps * ref64.abs().max().item()
            assert gap.max().item() <= tol, (
                f"resize_argmax vs {name}: {int(diff.sum())} labels differ, gap {gap.max():.3g}"
            )


def test_resize_argmax_ties_and_nan() -> None:
    x = rand(1, 5, 6, 7)
    x[:, 3] = x[:, 1] = x.amax(1) + 1  # exact tie between channels 1 and 3: the first wins
    assert (resize_argmax(x, (11, 9), backend="triton") == 1).all()
    x[0, 4, 2, 3] = float("nan")  # NaN is maximal, as in torch.argmax
    want = F.interpolate(x, size=(11, 9), mode="bilinear", align_corners=False).argmax(1)
    assert torch.equal(resize_argmax(x, (11, 9), backend="triton"), want)


def test_triton_rejects_float64() -> None:
    with pytest.raises(RuntimeError, match="float16/bfloat16/float32"):
        resize_bilinear_triton(rand(1, 1, 2, 2, dtype=torch.float64), (3, 3))


# ------------------------------------------------------------------------------------------- whole model
@pytest.mark.parametrize("kind", ["convnext", "swin"])
def test_model_triton_backend_matches_transformers(kind) -> None:
    """`load(..., backend="triton")`: every head op through the Triton kernels, against transformers."""
    import upernet_fast
    from conftest import compare_logits, make_reference

    ref = make_reference(kind)
    fast = upernet_fast.load(ref, backend="triton")
    assert all(fast.ops_for().backend_of(op) == "triton" for op in ("conv_bn_relu", "upsample_shift_add"))
    x = torch.randn(1, 3, 53, 67, generator=torch.Generator().manual_seed(7))  # odd, not multiples of 32
    with torch.no_grad():
        report = compare_logits(ref(x).logits, fast(x.to(DEVICE)).logits.cpu(), 1e-4)
    print(f"{kind} triton backend vs transformers: {report}")
