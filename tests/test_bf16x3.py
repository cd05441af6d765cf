"""Split-bfloat16 float32 convs (kernels/bf16x3.py): against a float64 conv on odd shapes, the C split and
combine passes against their PyTorch twins, bad input, and the choice (dispatch.bf16x3_choice)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from upernet_fast import dispatch, tuning
from upernet_fast.kernels import bf16x3, native
from upernet_fast.kernels._common import native_bf16

needs_bf16 = pytest.mark.skipif(not native_bf16(), reason="oneDNN has no native bfloat16 convs on this CPU")
CL = torch.channels_last


def _inputs(c_in, c_out, h, w, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, c_in, h, w, generator=g).contiguous(memory_format=CL)
    weight = torch.randn(c_out, c_in, k, k, generator=g) / (k * k * c_in) ** 0.5
    bias = torch.randn(c_out, generator=g)
    return x, weight, bias


@needs_bf16
@pytest.mark.parametrize("native_on", [True, False])
@pytest.mark.parametrize(
    "c_in,c_out,h,w,k,relu,with_bias,width",
    [
        (37, 29, 13, 29, 3, True, True, None),
        (64, 48, 9, 7, 3, False, False, None),
        (19, 70, 11, 5, 1, True, True, None),
        (37, 29, 13, 29, 3, True, True, 32),  # run 3 columns wider: the same conv
        (64, 48, 9, 7, 3, False, True, 16),
    ],
)
def test_conv_bf16x3_matches_float64(monkeypatch, native_on, c_in, c_out, h, w, k, relu, with_bias, width):
    if not native_on:
        monkeypatch.setattr(native, "library", lambda: None)
    elif native.library() is None:
        pytest.skip("C helpers unavailable")
    x, weight, bias = _inputs(c_in, c_out, h, w, k)
    bias = bias if with_bias else None
    y = bf16x3.conv_bf16x3(x, bf16x3.bf16x3_weight(weight), bias, k // 2, relu, width)
    ref = F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), padding=k // 2)
    ref = ref.relu() if relu else ref
    assert y.dtype == torch.float32 and y.shape == ref.shape and y.is_contiguous(memory_format=CL)
    err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
    # measured 3-8e-6 (the float32 direct conv: 1-2e-6); a plain bfloat16 conv is ~2e-3
    assert err < 3e-5, err
    plain = F.conv2d(x.bfloat16(), weight.bfloat16(), None, padding=k // 2).double()
    plain = plain + bias.double().view(1, -1, 1, 1) if with_bias else plain
    plain = plain.relu() if relu else plain
    assert ((plain - ref).abs().max() / ref.abs().max()).item() > 10 * err  # the split is what helps


@pytest.mark.skipif(native.library() is None, reason="C helpers unavailable")
def test_native_split_and_combine_equal_their_pytorch_twins(monkeypatch):
    x = torch.randn(1, 40, 7, 9).contiguous(memory_format=CL) * torch.logspace(-30, 30, 40).view(1, -1, 1, 1)
    x[0, 0, 0, 0] = float("nan")
    hi, x3 = bf16x3.split_input(x)
    bits = lambda t: t.view(torch.int16).where(~t.isnan(), 0)  # noqa: E731  (bitwise; any NaN is a NaN)
    assert torch.equal(bits(hi), bits(x.to(torch.bfloat16)))
    lo = (x - hi.float()).to(torch.bfloat16)
    assert torch.equal(bits(x3), bits(torch.cat([hi, hi, lo], 1)))
    assert hi[0, 0, 0, 0].isnan() and x3[0, [0, 40, 80], 0, 0].isnan().all()
    wide_hi, wide_x3 = bf16x3.split_input(x, 12)  # 3 zero columns on the right
    monkeypatch.setattr(native, "library", lambda: None)
    twin_hi, twin_x3 = bf16x3.split_input(x, 12)
    monkeypatch.undo()
    assert wide_hi.shape == (1, 40, 7, 12) and wide_x3.shape == (1, 120, 7, 12)
    assert torch.equal(bits(wide_hi), bits(twin_hi)) and torch.equal(bits(wide_x3), bits(twin_x3))
    assert torch.equal(bits(wide_hi[..., :9]), bits(hi)) and not wide_x3[..., 9:].any()
    y_hi = torch.randn(1, 33, 8, 5).bfloat16().contiguous(memory_format=CL)
    r = (torch.randn(1, 33, 8, 5) / 300).bfloat16().contiguous(memory_format=CL)
    bias = torch.randn(33)
    for relu in (True, False):
        for width in (5, 3):  # 3: the first columns of maps run wider
            c = bf16x3._combine(y_hi, r, bias, relu, width)
            monkeypatch.setattr(native, "library", lambda: None)
            t = bf16x3._combine(y_hi, r, bias, relu, width)
            monkeypatch.undo()
            assert c.shape == (1, 33, 8, width) and torch.equal(c, t)


def test_bad_input_is_refused():
    x, weight, _ = _inputs(8, 4, 5, 5, 3)
    split = bf16x3.bf16x3_weight(weight)
    with pytest.raises(ValueError, match="channels-last CPU float32"):
        bf16x3.conv_bf16x3(x.bfloat16(), split, None, 1, False)
    with pytest.raises(ValueError, match="channels-last CPU float32"):
        bf16x3.conv_bf16x3(x.contiguous(), split, None, 1, False)
    with pytest.raises(ValueError, match="split_weight must be bf16x3_weight"):
        bf16x3.conv_bf16x3(x, weight, None, 1, False)
    with pytest.raises(ValueError, match="padding k // 2"):
        bf16x3.conv_bf16x3(x, split, None, 0, False)
    with pytest.raises(ValueError, match="width 4 is narrower than the input's 5"):
        bf16x3.conv_bf16x3(x, split, None, 1, False, 4)


def test_choice_rules(monkeypatch):
    x = torch.empty(1, 512, 64, 64).contiguous(memory_format=CL)
    w = torch.empty(512, 512, 3, 3)
    off = dispatch.ops_for("torch", "cpu", bf16x3=False, tune=False)
    assert dispatch.bf16x3_choice(off, x, w, 1) == (
        False,
        "bf16x3 switched off (bf16x3=False / UPERNET_FAST_BF16X3=0)",
    )
    ops = dispatch.ops_for("torch", "cpu", bf16x3=True, tune=False)
    assert dispatch.bf16x3_choice(ops, x.contiguous(), w, 1)[0] is False  # NCHW input
    assert dispatch.bf16x3_choice(ops, x.bfloat16(), w, 1)[0] is False
    monkeypatch.setattr(dispatch, "amx_bf16", lambda: False)
    assert dispatch.bf16x3_choice(ops, x, w, 1) == (
        False,
        "no AMX-BF16 on this CPU (bf16x3 would be slower than float32)",
    )
    monkeypatch.setattr(dispatch, "amx_bf16", lambda: True)
    assert dispatch.bf16x3_choice(ops, x, w, 1)[0] is True
    small = torch.empty(1, 512, 16, 64).contiguous(memory_format=CL)
    assert dispatch.bf16x3_choice(ops, small, w, 1)[0] is False
    monkeypatch.setattr(tuning, "bf16x3", lambda *a: (False, "measured: slower"))
    tuned = dispatch.ops_for("torch", "cpu", bf16x3=True, tune=True)
    assert dispatch.bf16x3_choice(tuned, x, w, 1) == (False, "measured: slower")
    monkeypatch.setenv(dispatch.BF16X3_ENV_VAR, "0")
    assert dispatch.ops_for("torch", "cpu").bf16x3 is False


def test_tuning_keeps_the_default_within_margin(monkeypatch, tmp_path):
    monkeypatch.setenv(native.CACHE_ENV_VAR, str(tmp_path))
    tuning._table.cache_clear()
    try:
        monkeypatch.setattr(tuning, "measure_bf16x3", lambda *a: {1: 10.0, 0: 10.3})
        assert tuning.bf16x3(256, 256, 64, 64, default=False)[0] is False  # within MARGIN: default kept
        assert tuning.bf16x3(256, 256, 64, 64, default=True)[0] is False  # the cached entry is reused
        monkeypatch.setattr(tuning, "measure_bf16x3", lambda *a: {1: 10.0, 0: 20.0})
        use, why = tuning.bf16x3(256, 256, 32, 32)
        assert use is True and why == "measured on this CPU: bf16x3 10 ms, float32 20 ms -> bf16x3"
        assert tuning.bf16x3(8, 8, 8, 8) == (None, "too small to time reliably")
    finally:
        tuning._table.cache_clear()


def test_width_choice(monkeypatch, tmp_path):
    """The bf16x3 convs' width: the input's own without tuning or at multiples of 32, else the measured
    fastest of the input's width and the next multiples of 16 and 32 (cached like every entry)."""
    monkeypatch.setenv(native.CACHE_ENV_VAR, str(tmp_path))
    tuning._table.cache_clear()
    try:
        assert tuning.bf16x3_widths(170) == [170, 176, 192] and tuning.bf16x3_widths(176) == [176, 192]
        assert tuning.bf16x3_widths(96) == [96]
        w = torch.empty(512, 512, 3, 3)
        x = torch.empty(1, 512, 128, 170).contiguous(memory_format=CL)
        off = dispatch.ops_for("torch", "cpu", tune=False)
        assert dispatch.bf16x3_width_choice(off, x, w, 1) == (170, "the input's width (tuning off)")
        tuned = dispatch.ops_for("torch", "cpu", tune=True)
        wide = torch.empty(1, 512, 128, 192).contiguous(memory_format=CL)
        assert dispatch.bf16x3_width_choice(tuned, wide, w, 1)[0] == 192
        measured = []
        fake = {170: 216.0, 176: 147.0, 192: 164.0}
        monkeypatch.setattr(tuning, "measure_bf16x3_width", lambda *a: measured.append(a) or fake)
        width, why = dispatch.bf16x3_width_choice(tuned, x, w, 1)
        assert width == 176 and measured == [(512, 512, 128, 170)]
        assert why.endswith("170 columns 216 ms, 176 columns 147 ms, 192 columns 164 ms -> 176 columns")
        tuning._table.cache_clear()  # read back from the file: a valid entry
        assert dispatch.bf16x3_width_choice(tuned, x, w, 1)[0] == 176 and len(measured) == 1
        monkeypatch.setattr(tuning, "measure_bf16x3_width", lambda *a: {170: 150.0, 176: 147.0, 192: 164.0})
        tall = torch.empty(1, 512, 100, 170).contiguous(memory_format=CL)  # within MARGIN: own width kept
        assert dispatch.bf16x3_width_choice(tuned, tall, w, 1)[0] == 170
    finally:
        tuning._table.cache_clear()


@needs_bf16
def test_model_runs_the_chosen_width(monkeypatch):
    """A forced width reaches conv_bf16x3 and the plan, and the answer stays the conv's."""
    import upernet_fast
    from conftest import make_reference

    split3x3 = lambda ops, x, w, p: (w.shape[-1] == 3, "forced")  # noqa: E731
    monkeypatch.setattr(dispatch, "bf16x3_choice", split3x3)
    monkeypatch.setattr(dispatch, "bf16x3_width_choice", lambda ops, x, w, p: (x.shape[3] + 16, "forced"))
    seen = []
    real = dispatch.conv_bf16x3
    monkeypatch.setattr(
        dispatch, "conv_bf16x3", lambda x, *a: seen.append((x.shape[3], a[-1])) or real(x, *a)
    )
    ref = make_reference("convnext")
    fast = upernet_fast.load(ref, winograd=False, tune=False, bf16x3=True)
    x = torch.randn(1, 3, 96, 136, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got, want = fast(x).logits, ref(x).logits
    assert seen and all(width == w + 16 for w, width in seen)
    assert any("columns wide" in p["impl"] for p in fast.plan(96, 136))
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-4
