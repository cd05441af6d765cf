"""The ConvNeXt block MLP as split-bfloat16 GEMMs (kernels/gemm_bf16x3.py, csrc/gemm_bf16x3.c): against a
float64 block on odd shapes, its GELU against float64, bad input, the choice (dispatch.mlp_bf16x3_choice)
and whole-model parity with transformers when forced on. MKL's bfloat16 GEMM also runs (emulated, slowly)
on CPUs without AMX, so the numerics are checked on every CPU that has it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import upernet_fast
from conftest import compare_logits, make_reference
from upernet_fast import dispatch, tuning
from upernet_fast.backbones import convnext
from upernet_fast.kernels import gemm_bf16x3 as mx
from upernet_fast.kernels import native

runs_here = pytest.mark.skipif(
    native.library() is None or mx.gemm_bf16bf16f32() is None,
    reason="needs the C helpers and MKL's cblas_gemm_bf16bf16f32 in libtorch_cpu",
)
CL = torch.channels_last
EPS = 1e-6


def _block(c, hidden, b, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c, h, w, generator=g).contiguous(memory_format=CL)
    y = (3 * torch.randn(b, c, h, w, generator=g) + 1).contiguous(memory_format=CL)  # the dwconv output
    w1 = torch.randn(hidden, c, generator=g) / c**0.5
    w2 = torch.randn(c, hidden, generator=g) / hidden**0.5
    return x, y, w1, 0.3 * torch.randn(hidden, generator=g), w2, 0.1 * torch.randn(c, generator=g)


def _reference(x, y, w1, b1, w2, b2, bf16=False):
    """In float64; ``bf16``: with both GEMMs' operands rounded to bfloat16 (one plain bf16 pass each)."""
    r = (lambda t: t.bfloat16().double()) if bf16 else (lambda t: t)  # noqa: E731
    t = r(F.layer_norm(y.double().permute(0, 2, 3, 1), (y.shape[1],), eps=EPS))
    t = r(F.gelu(F.linear(t, r(w1.double()), b1.double())))
    return x.double() + F.linear(t, r(w2.double()), b2.double()).permute(0, 3, 1, 2)


@runs_here
@pytest.mark.parametrize(
    "c,hidden,b,h,w",
    [
        (40, 160, 2, 7, 9),
        (37, 100, 1, 23, 29),
        (96, 384, 1, 33, 17),
    ],  # odd widths; 667 and 561 rows: 2 chunks
)
def test_mlp_bf16x3_matches_float64(c, hidden, b, h, w):
    x, y, w1, b1, w2, b2 = _block(c, hidden, b, h, w)
    ref, plain = _reference(x, y, w1, b1, w2, b2), _reference(x, y, w1, b1, w2, b2, bf16=True)
    out = mx.mlp_bf16x3_(y, x, mx.pack_weight(w1), b1, mx.pack_weight(w2), b2, EPS)
    assert out is y and y.dtype == torch.float32 and y.is_contiguous(memory_format=CL)
    err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
    assert err < 2e-5, err  # measured ~4e-6 (float32 oneDNN: ~7e-7; one bfloat16 pass: ~3e-3)
    assert ((plain - ref).abs().max() / ref.abs().max()).item() > 10 * err  # the split is what helps


@runs_here
def test_gelu_is_the_erf_form():
    z = torch.cat([torch.linspace(-12, 12, 100001), torch.tensor([0.0, -0.0, 1e-30, -1e-30, 100.0, -100.0])])
    out = torch.empty_like(z)
    native.library().gelu_erf_reference(z.data_ptr(), out.data_ptr(), z.numel())
    ref = F.gelu(z.double())
    err = (out.double() - ref).abs().max().item()
    assert err < 1e-6, err  # A&S 7.1.28: |erf error| < 3e-7, measured 8.6e-7 here; float32 PyTorch ~1e-6
    tanh_form = F.gelu(z.double(), approximate="tanh")
    assert (tanh_form - ref).abs().max().item() > 100 * err  # the test tells the two GELUs apart


@runs_here
def test_bad_input_is_refused_before_anything_is_written():
    x, y, w1, b1, w2, b2 = _block(40, 160, 1, 5, 6)
    p1, p2 = mx.pack_weight(w1), mx.pack_weight(w2)
    before = y.clone()
    with pytest.raises(ValueError, match="channels-last"):
        mx.mlp_bf16x3_(y.contiguous(), x.contiguous(), p1, b1, p2, b2, EPS)
    with pytest.raises(ValueError, match="CPU float32"):
        mx.mlp_bf16x3_(y.double(), x, p1, b1, p2, b2, EPS)
    with pytest.raises(ValueError, match="pack_weight"):
        mx.mlp_bf16x3_(y, x, w1.t().contiguous().bfloat16(), b1, p2, b2, EPS)
    with pytest.raises(ValueError, match="pack_weight"):
        mx.mlp_bf16x3_(y, x, p2, b2, p1, b1, EPS)
    with pytest.raises(ValueError, match="must match"):
        mx.mlp_bf16x3_(y, x[:, :, :4].contiguous(memory_format=CL), p1, b1, p2, b2, EPS)
    assert torch.equal(y, before)


def test_pack_weight_layout():
    w = torch.randn(6, 4)  # (N, K)
    p = mx.pack_weight(w)  # 3K = 12 and N = 6 are no multiples of 32: the row-major layout on every CPU
    hi = w.t().bfloat16()
    assert p.shape == (12, 6) and p.dtype == torch.bfloat16
    assert torch.equal(p[:4], hi) and torch.equal(p[4:8], hi)
    assert torch.equal(p[8:], (w.t() - hi.float()).bfloat16())


def test_pack_weight_amx_tile_layout():
    """[W_hi; W_lo] (nothing twice, unlike MKL's [W_hi; W_hi; W_lo]) in tiles: tile (j, i) row r holds rows
    32i + 2r and 32i + 2r + 1, columns 16j .. 16j + 15, interleaved (TDPBF16PS's operand layout), checked
    element by element against the row-major packing."""
    w = torch.randn(64, 96)  # (N, K): 2K = 192 = 6 tiles deep, N = 64 = 4 tiles wide
    rm, tiles = mx.pack_weight(w, amx=False), mx.pack_weight(w, amx=True)
    hi_lo = torch.cat([rm[:96], rm[192:]])
    assert torch.equal(rm[:96], rm[96:192])
    assert tiles.shape == (4, 6, 16, 32) and tiles.dtype == torch.bfloat16
    assert mx.packed_shape(tiles) == mx.packed_shape(rm) == (288, 64)
    for j, i, r, col in [(0, 0, 0, 0), (0, 0, 0, 1), (1, 2, 5, 7), (3, 5, 15, 31), (2, 4, 9, 20)]:
        c, e = divmod(col, 2)
        assert torch.equal(tiles[j, i, r, col], hi_lo[32 * i + 2 * r + e, 16 * j + c]), (j, i, r, col)
    with pytest.raises(ValueError, match="divisible by 32"):
        mx.pack_weight(torch.randn(64, 40), amx=True)


def test_amx_gemm_switch(monkeypatch):
    w = torch.randn(64, 96)
    monkeypatch.setenv(mx.AMX_ENV_VAR, "0")
    assert not mx.amx_gemm_available() and mx.pack_weight(w).dim() == 2
    monkeypatch.setenv(mx.AMX_ENV_VAR, "1")
    assert (mx.pack_weight(w).dim() == 4) == mx.amx_gemm_available()


@runs_here
def test_amx_packed_weights_refused_where_the_kernel_cannot_run(monkeypatch):
    x = torch.randn(1, 32, 2, 3).contiguous(memory_format=CL)
    packed = mx.pack_weight(torch.randn(32, 32), amx=True)  # packing is plain PyTorch: works on any CPU
    monkeypatch.setattr(mx, "_amx_granted", lambda: False)
    with pytest.raises(ValueError, match="packed for the AMX kernel"):
        mx.conv1x1_bf16x3(x, packed, None, False)
    y = x.clone()
    with pytest.raises(ValueError, match="packed for the AMX kernel"):
        mx.mlp_bf16x3_(
            y,
            x,
            mx.pack_weight(torch.randn(128, 32), amx=True),
            torch.zeros(128),
            mx.pack_weight(torch.randn(32, 128), amx=True),
            torch.zeros(32),
            EPS,
        )
    assert torch.equal(y, x)


amx_here = pytest.mark.skipif(
    not mx.amx_gemm_available(), reason="needs AMX-BF16 (our AMX GEMM kernel) and the C helpers"
)


@runs_here
@amx_here
@pytest.mark.parametrize(
    "k,n,rows",
    [
        (96, 512, 91),  # 2 full 32-row blocks + a 27-row tail (two tile rows)
        (192, 64, 13),  # a 13-row tail only (one tile row)
        (512, 608, 545),  # K = 512 > one 256-deep k panel, N = 608 > one 512-wide n panel, 17-row tail
        (32, 32, 1),
        (384, 96, 64),  # whole blocks only
    ],
)
def test_amx_gemm_matches_mkl_and_float64(k, n, rows):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, k, 1, rows, generator=g).contiguous(memory_format=CL)
    weight = torch.randn(n, k, generator=g) / k**0.5
    bias = torch.randn(n, generator=g)
    ours = mx.conv1x1_bf16x3(x, mx.pack_weight(weight, amx=True), bias, True)
    mkl = mx.conv1x1_bf16x3(x, mx.pack_weight(weight, amx=False), bias, True)
    ref = F.conv2d(x.double(), weight.double()[:, :, None, None], bias.double()).relu()
    scale = ref.abs().max()
    assert ((ours.double() - ref).abs().max() / scale).item() < 2e-5
    # the same bf16 products summed in float32, in another order
    assert ((ours - mkl).abs().max() / scale).item() < 1e-6


@runs_here
@amx_here
def test_amx_mlp_matches_mkl():
    """The block MLP with AMX-packed weights (its second GEMM accumulates onto the output) against MKL's:
    1073 rows, two 512-row chunks and a 49-row one."""
    x, y, w1, b1, w2, b2 = _block(96, 384, 1, 37, 29)
    ref = _reference(x, y, w1, b1, w2, b2)
    outs = []
    for amx in (True, False):
        out = y.clone()
        mx.mlp_bf16x3_(out, x, mx.pack_weight(w1, amx=amx), b1, mx.pack_weight(w2, amx=amx), b2, EPS)
        outs.append(out)
    assert ((outs[0].double() - ref).abs().max() / ref.abs().max()).item() < 2e-5
    # sums in another order: a last-bit difference in the hidden layer can move its split, so looser than 1x1
    assert ((outs[0] - outs[1]).abs().max() / ref.abs().max()).item() < 5e-6
    with pytest.raises(ValueError, match="one layout"):
        mx.mlp_bf16x3_(y, x, mx.pack_weight(w1, amx=True), b1, mx.pack_weight(w2, amx=False), b2, EPS)


def test_choice_rules(monkeypatch):
    x = torch.zeros(1, 384, 8, 8).contiguous(memory_format=CL)
    plan = dispatch.Plan(bf16x3=True, tune=False)
    assert dispatch.mlp_bf16x3_choice(None, x, 1536, "gelu") == (False, "float32 while compiling")
    off = dispatch.mlp_bf16x3_choice(dispatch.Plan(bf16x3=False), x, 1536, "gelu")
    assert off[0] is False and "switched off" in off[1]
    assert "erf GELU only" in dispatch.mlp_bf16x3_choice(plan, x, 1536, "relu")[1]
    assert "CPU float32" in dispatch.mlp_bf16x3_choice(plan, x.double(), 1536, "gelu")[1]
    monkeypatch.setattr(mx, "gemm_bf16x3_blocker", lambda t: None)
    monkeypatch.setattr(dispatch, "gemm_bf16x3_blocker", lambda t: None)
    monkeypatch.setattr(dispatch, "amx_bf16", lambda: False)
    assert "no AMX-BF16" in dispatch.mlp_bf16x3_choice(plan, x, 1536, "gelu")[1]
    monkeypatch.setattr(dispatch, "amx_bf16", lambda: True)
    use, why = dispatch.mlp_bf16x3_choice(plan, x, 1536, "gelu")
    assert use is True and why.startswith("default rule")
    narrow = torch.zeros(1, dispatch.MLP_BF16X3_MIN_CHANNELS - 1, 8, 8)
    assert dispatch.mlp_bf16x3_choice(plan, narrow, 400, "gelu")[0] is False
    monkeypatch.setattr(tuning, "mlp_bf16x3", lambda *a: (False, "measured: float32"))
    assert dispatch.mlp_bf16x3_choice(dispatch.Plan(bf16x3=True, tune=True), x, 1536, "gelu") == (
        False,
        "measured: float32",
    )


@runs_here
@pytest.mark.parametrize("kind", ["convnext", "swin"])
@pytest.mark.parametrize("split", [True, False])
def test_model_with_bf16x3_mlps_matches_transformers(monkeypatch, split, kind):
    """Forced on for every stage (or off), the whole model stays within the parity tolerance, and the plan
    says which MLP path ran and why (Swin: the residual is also the LayerNorm's input, in place)."""
    ref = make_reference(kind, hidden_size=64, num_labels=7)
    monkeypatch.setattr(dispatch, "amx_bf16", lambda: True)
    monkeypatch.setattr(dispatch, "MLP_BF16X3_MIN_CHANNELS", 0 if split else 10**6)
    fast = upernet_fast.load(ref, tune=False)
    x = torch.randn(2, 3, 75, 101, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        compare_logits(ref(x).logits, fast(x).logits, 1e-4)
    plan = fast.plan(75, 101, batch=2)
    mlps = [p for p in plan if "(MLP)" in p["part"]]
    if kind == "swin" and not split:  # Swin notes its MLP as its two Linears, with why not bf16x3
        mlps = [p for p in plan if p["part"].startswith(("blocks.*.intermediate", "blocks.*.output"))]
        assert all("not bf16x3: default rule" in p["why"] for p in mlps), mlps
    assert mlps and all(("bf16x3" in p["impl"]) == split for p in mlps), mlps
    assert all("default rule" in p["why"] for p in mlps), mlps
    strict = upernet_fast.load(ref, bf16x3=False).plan(75, 101)
    assert not any("bf16x3" in p["impl"] for p in strict if "(MLP)" in p["part"])


@runs_here
@pytest.mark.parametrize(
    "k,n,b,h,w,relu,with_bias",
    [(37, 29, 2, 23, 29, True, True), (96, 150, 1, 7, 9, False, True), (40, 70, 1, 5, 3, False, False)],
)  # 1334 rows: two chunks
def test_conv1x1_bf16x3_matches_float64(k, n, b, h, w, relu, with_bias):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(b, k, h, w, generator=g).contiguous(memory_format=CL)
    weight = torch.randn(n, k, 1, 1, generator=g) / k**0.5
    bias = torch.randn(n, generator=g) if with_bias else None
    ref = F.conv2d(x.double(), weight.double(), None if bias is None else bias.double())
    ref = ref.relu() if relu else ref
    y = mx.conv1x1_bf16x3(x, mx.pack_weight(weight.flatten(1)), bias, relu)
    assert y.shape == ref.shape and y.dtype == torch.float32 and y.is_contiguous(memory_format=CL)
    err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
    assert err < 2e-5, err  # measured 3-5e-6
    plain = F.conv2d(x.bfloat16().double(), weight.bfloat16().double())  # one plain bf16 pass
    plain = plain + bias.double().view(1, -1, 1, 1) if with_bias else plain
    plain = plain.relu() if relu else plain
    assert ((plain - ref).abs().max() / ref.abs().max()).item() > 10 * err


@runs_here
def test_conv1x1_bf16x3_refuses_bad_input():
    x = torch.randn(1, 8, 4, 5).contiguous(memory_format=CL)
    packed = mx.pack_weight(torch.randn(6, 8))
    with pytest.raises(ValueError, match="channels-last"):
        mx.conv1x1_bf16x3(x.contiguous(), packed, None, False)
    with pytest.raises(ValueError, match=r"pack_weight\(\) of an \(N, 8\) weight"):
        mx.conv1x1_bf16x3(x, mx.pack_weight(torch.randn(6, 7)), None, False)
    with pytest.raises(ValueError, match="bias must have shape"):
        mx.conv1x1_bf16x3(x, packed, torch.zeros(5), False)
    with pytest.raises(ValueError, match="CPU float32"):
        mx.conv1x1_bf16x3(x.bfloat16(), packed, None, False)
    with pytest.raises(ValueError, match=r"\(B, K, H, W\)"):
        mx.conv1x1_bf16x3(torch.randn(8, 4), packed, None, False)


def test_1x1_choice_rule(monkeypatch):
    ops = dispatch.ops_for("torch", "cpu", tune=False, bf16x3=True)
    monkeypatch.setattr(dispatch, "amx_bf16", lambda: True)
    monkeypatch.setattr(dispatch, "gemm_bf16x3_blocker", lambda t: None)
    channels, pixels = dispatch.BF16X3_1X1_WINS
    x = torch.zeros(1, channels, 16, pixels // 16).contiguous(memory_format=CL)
    w = torch.zeros(channels, channels, 1, 1)
    assert dispatch.bf16x3_choice(ops, x, w, 0)[0] is True
    assert dispatch.bf16x3_choice(ops, x[:, :, :8], w, 0)[0] is False  # too few pixels
    assert dispatch.bf16x3_choice(ops, x, w[: channels - 1], 0)[0] is False  # too few channels
    nchw = dispatch.bf16x3_choice(ops, torch.zeros(1, channels, 16, 16), w, 0)
    assert nchw[0] is False and "channels-last" in nchw[1]
    off = dispatch.ops_for("torch", "cpu", tune=False, bf16x3=False)
    assert dispatch.bf16x3_choice(off, x, w, 0)[0] is False


@runs_here
@pytest.mark.parametrize("kind", ["convnext", "swin"])
def test_bf16x3_paths_run_under_inference_mode(monkeypatch, kind):
    """Under torch.inference_mode the folded weights are inference tensors (no version counter): the packed
    bf16x3 weights must be keyed by the module's own parameters, not by the folds."""
    ref = make_reference(kind, hidden_size=64, num_labels=7)
    monkeypatch.setattr(dispatch, "amx_bf16", lambda: True)
    monkeypatch.setattr(dispatch, "MLP_BF16X3_MIN_CHANNELS", 0)
    monkeypatch.setattr(dispatch, "BF16X3_1X1_WINS", (0, 0))
    fast = upernet_fast.load(ref, tune=False)
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        out = fast(x).logits
        again = fast(x).logits  # the cached packs are reused
    with torch.no_grad():
        compare_logits(ref(x).logits, out, 1e-4)
    assert torch.equal(out, again)
    assert any("bf16x3" in p["impl"] for p in fast.plan(64, 96) if "(MLP)" in p["part"])
    assert any(p["impl"].startswith("bf16x3 GEMM") for p in fast.plan(64, 96))


@runs_here
@amx_here
@pytest.mark.parametrize("split", [True, False])
def test_swin_linears_as_bf16x3_match_transformers(monkeypatch, split):
    """Swin's qkv, attention output and patch-merging Linears as bf16x3 (forced by the default rule; every
    feature count a multiple of 32), or not: parity with transformers, and the plan says which ran and why."""
    ref = make_reference("swin", backbone_overrides={"embed_dim": 32}, hidden_size=64, num_labels=7)
    monkeypatch.setattr(dispatch, "BF16X3_1X1_WINS", (0, 0) if split else (10**6, 0))
    fast = upernet_fast.load(ref, tune=False)
    x = torch.randn(2, 3, 75, 101, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        compare_logits(ref(x).logits, fast(x).logits, 1e-4)
    names = ("blocks.*.attention.self.query/key/value", "blocks.*.attention.output.dense", "reduction")
    notes = [p for p in fast.plan(75, 101, batch=2) if p["part"].startswith(names)]
    assert len(notes) == 3 * 4 - 1, notes  # qkv and output per stage, a reduction between stages
    for p in notes:
        assert ("bf16x3 GEMM" in p["impl"]) == split, p
        assert "default rule" in p["why"] and (split or "not bf16x3" in p["why"]), p
    strict = upernet_fast.load(ref, bf16x3=False).plan(75, 101)
    assert not any("bf16x3" in p["impl"] for p in strict if p["part"].startswith(names))


@runs_here
@amx_here
@pytest.mark.parametrize("split", [True, False])
def test_convnext_downsampling_as_bf16x3_matches_transformers(monkeypatch, split):
    """ConvNeXt's downsampling (LayerNorm + 2x2 stride-2 conv) as one bf16x3 GEMM over the normalised 2x2
    patches, the LayerNorm's affine folded in (forced by the default rule; in features 4 x 32..96 and out
    features multiples of 32), or not; odd map sizes, so the conv drops a last row or column."""
    ref = make_reference("convnext", backbone_overrides={"hidden_sizes": [32, 64, 96, 128]}, hidden_size=64)
    monkeypatch.setattr(dispatch, "BF16X3_1X1_WINS", (0, 0) if split else (10**6, 0))
    ran: list = []
    real = convnext.ConvNextStage._downsample_bf16x3
    monkeypatch.setattr(
        convnext.ConvNextStage, "_downsample_bf16x3", lambda s, x: ran.append(1) or real(s, x)
    )
    fast = upernet_fast.load(ref, tune=False)
    x = torch.randn(2, 3, 75, 101, generator=torch.Generator().manual_seed(1))  # stage maps 18x25, 9x12, 4x6
    with torch.no_grad():
        compare_logits(ref(x).logits, fast(x).logits, 1e-4)
    assert len(ran) == (3 if split else 0)
    notes = [p for p in fast.plan(75, 101, batch=2) if p["part"].startswith("downsampling_layer")]
    assert [p["layer"] for p in notes] == [f"backbone.encoder.stages.{i}" for i in range(1, 4)]
    for p in notes:
        assert ("bf16x3 GEMM" in p["impl"]) == split and "default rule" in p["why"], p
    strict = upernet_fast.load(ref, bf16x3=False).plan(75, 101)
    assert not any("bf16x3" in p["impl"] for p in strict if p["part"].startswith("downsampling_layer"))


def test_linear_bf16x3_choice_says_why_not(monkeypatch):
    plan, x = dispatch.Plan(bf16x3=True, tune=False), torch.zeros(1, 4, 4, 64)
    assert dispatch.linear_bf16x3_choice(None, x, (64, 64), (1, 4, 4)) == (False, "float32 while compiling")
    off = dispatch.linear_bf16x3_choice(dispatch.Plan(bf16x3=False), x, (64, 64), (1, 4, 4))
    assert off[0] is False and "switched off" in off[1]
    assert "CPU float32" in dispatch.linear_bf16x3_choice(plan, x.double(), (64, 64), (1, 4, 4))[1]
    monkeypatch.setattr(dispatch, "gemm_bf16x3_blocker", lambda t: None)
    monkeypatch.setattr(dispatch, "amx_gemm_available", lambda: False)
    assert "AMX GEMM kernel" in dispatch.linear_bf16x3_choice(plan, x, (64, 64), (1, 4, 4))[1]
    monkeypatch.setattr(dispatch, "amx_gemm_available", lambda: True)
    assert "divisible by 32" in dispatch.linear_bf16x3_choice(plan, x, (48, 64), (1, 4, 4))[1]
    monkeypatch.setattr(dispatch, "BF16X3_1X1_WINS", (0, 0))
    assert dispatch.linear_bf16x3_choice(plan, x, (64, 96), (1, 4, 4))[0] is True


def test_linear_bf16x3_refuses_an_activation():
    from upernet_fast.backbones.fused_linear import LinearWeights, linear

    with pytest.raises(ValueError, match="without activation"):
        linear(torch.zeros(4, 32), LinearWeights(torch.zeros(32, 32), None), ("gelu", "none"), bf16x3=True)
