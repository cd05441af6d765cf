"""The frozen plan lists the backbone's implementation choices and the kernels' C-or-PyTorch ones as the
code takes them (checked with spies on the paths themselves), decided once per input signature."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import upernet_fast
from conftest import make_reference
from upernet_fast import dispatch
from upernet_fast.backbones import convnext, fused_linear, swin
from upernet_fast.kernels import _common, fpn, native, resize, winograd

ONEDNN = fused_linear.use_onednn(torch.zeros(1))  # CPU float32 with oneDNN: this PyTorch build
ONEDNN_CONV = ONEDNN and convnext._CONV_POINTWISE is not None
X = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _backbone_notes(model: upernet_fast.FastUperNet) -> list[dict[str, str]]:
    return [p for p in model.plan(64, 64) if p["layer"].startswith("backbone.")]


def _shape(part: str) -> tuple[int, int]:
    i, o = re.search(r"(\d+)->(\d+), torch\.", part).groups()
    return int(i), int(o)


def _spy(monkeypatch, owner, name: str, calls: list, record=lambda out, *a, **k: None) -> None:
    """Replace `owner.name` by a wrapper appending `record(result, *args, **kwargs)` to `calls`."""
    real = getattr(owner, name)

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(record(out, *args, **kwargs))
        return out

    monkeypatch.setattr(owner, name, spy)


@pytest.mark.parametrize(
    "dtype,native_bf16", [(torch.float32, None), (torch.bfloat16, True), (torch.bfloat16, False)]
)
def test_convnext_notes_the_mlp_path_it_runs(monkeypatch, dtype, native_bf16):
    """One note per stage; oneDNN 1x1 convs exactly when `_forward_onednn` runs (CPU float32, or bf16 on a
    CPU with native bf16: forced both ways here), else the row-chunked path and its two Linears."""
    if native_bf16 and not _common.native_bf16():
        pytest.skip("no native bf16 on this CPU: oneDNN refuses bf16 convs, so it cannot be forced on")
    if native_bf16 is not None:
        monkeypatch.setattr(_common, "native_bf16", lambda: native_bf16)  # oneDNN's own bf16 rule
    ran: list = []
    _spy(monkeypatch, convnext.ConvNextLayer, "_forward_onednn", ran)
    model = upernet_fast.load(make_reference("convnext"), tune=False, dtype=dtype)
    notes = _backbone_notes(model)
    down = [p for p in notes if p["part"].startswith("downsampling_layer")]
    assert [p["layer"] for p in down] == [f"backbone.encoder.stages.{i}" for i in range(1, 4)]
    assert all(p["impl"] == "LayerNorm + oneDNN conv" for p in down), down  # 4 x 16..32: not multiples of 32
    notes = [p for p in notes if p not in down]
    mlp = [p for p in notes if "(MLP)" in p["part"]]
    assert [p["layer"] for p in mlp] == [f"backbone.encoder.stages.{i}" for i in range(4)]
    onednn = ONEDNN_CONV and native_bf16 is not False
    assert len(ran) == (5 if onednn else 0)  # depths [1, 1, 2, 1]
    if onednn:
        assert notes == mlp and all(p["impl"] == "oneDNN 1x1 convs, gelu + residual add fused" for p in mlp)
        kind = "CPU float32" if dtype == torch.float32 else "bfloat16 on a CPU with native bf16"
        assert all(p["why"].startswith(kind) for p in mlp), mlp
    else:
        assert all(p["impl"].startswith("row-chunked") for p in mlp), mlp
        linears = [p for p in notes if p not in mlp]
        assert len(linears) == 8 and all(p["impl"].startswith("MKL F.linear") for p in linears), linears
    assert f"{dtype}" in mlp[0]["part"]


@pytest.mark.skipif(not ONEDNN, reason="needs oneDNN (CPU float32)")
@pytest.mark.parametrize("max_narrow", [fused_linear.ONEDNN_MAX_NARROW, 24])
def test_swin_notes_each_linear_kind_as_it_runs(monkeypatch, max_narrow):
    """Per stage, one note per Linear kind (qkv, proj, fc1, fc2) and one per patch merging; oneDNN exactly
    for the (in, out) shapes the oneDNN inner product runs on. With the default rule every Linear of the
    tiny model (16..128 channels) is narrow; a lower threshold sends the wider stages to MKL."""
    monkeypatch.setattr(fused_linear, "ONEDNN_MAX_NARROW", max_narrow)
    ran: list = []
    _spy(monkeypatch, fused_linear, "_LINEAR_POINTWISE", ran, lambda out, x, *a: (x.shape[-1], out.shape[-1]))
    model = upernet_fast.load(make_reference("swin"), tune=False)
    notes = _backbone_notes(model)
    kinds = ["attention.self.query/key/value", "attention.output.dense", "intermediate.dense", "output.dense"]
    stages = [p for p in notes if not p["layer"].endswith("downsample")]
    assert len(stages) == 16 and [p["layer"] for p in stages[:4]] == ["backbone.encoder.layers.0"] * 4
    assert all(p["part"].startswith(f"blocks.*.{k}") for p, k in zip(stages, kinds * 4, strict=True))
    merging = [p for p in notes if p["layer"].endswith("downsample")]
    assert [p["layer"] for p in merging] == [f"backbone.encoder.layers.{i}.downsample" for i in range(3)]
    narrow = {_shape(p["part"]) for p in notes if p["impl"].startswith("oneDNN inner product")}
    mkl = {_shape(p["part"]) for p in notes if p["impl"].startswith("MKL F.linear")}
    assert len(narrow) + len(mkl) == len(notes)
    assert narrow == set(ran)  # the (in, out) shapes oneDNN actually ran
    assert all(min(s) < max_narrow for s in narrow) and all(min(s) >= max_narrow for s in mkl)
    fc1 = stages[2]
    assert fc1["impl"] == "oneDNN inner product, packed weight, gelu fused", fc1
    if max_narrow == 24:
        assert stages[6]["impl"] == "MKL F.linear + gelu" and "ONEDNN_MAX_NARROW 24" in stages[6]["why"]
    else:
        assert not mkl


@pytest.mark.parametrize("kind", ["convnext", "swin"])
def test_backbone_notes_are_made_once_per_signature(monkeypatch, kind):
    """The backbone notes while the plan is built; later forwards with that signature neither decide
    again nor add notes."""
    noted: list = []
    if kind == "convnext":
        _spy(monkeypatch, convnext.ConvNextBackbone, "_note_mlp", noted)
    else:
        _spy(monkeypatch, swin.SwinBackbone, "_note_linears", noted)
    model = upernet_fast.load(make_reference(kind), tune=False)
    first = model.plan(64, 64)
    assert any(p["layer"].startswith("backbone.") for p in first)
    n = len(noted)
    assert n > 0
    with torch.no_grad():
        model(X)
        model(X)
    assert model.plan(64, 64) == first and len(noted) == n
    assert any(p["layer"].startswith("backbone.") for p in model.plan(96, 64))  # another signature
    assert len(noted) > n


def test_resnet_has_no_backbone_choice():
    model = upernet_fast.load(make_reference("resnet"), tune=False)
    assert _backbone_notes(model) == []


@pytest.mark.parametrize(
    "args,error",
    [
        ((torch.zeros(1, 3, 64, 64),), TypeError),
        ((64.0, 64), TypeError),
        ((64, 0), ValueError),
        ((64, 64, True), ValueError),
    ],
)
def test_plan_takes_sizes_not_tensors(args, error):
    """`plan(x)` with an input tensor was a raw torch.zeros unpacking error; integer scalars are sizes."""
    model = upernet_fast.load(make_reference("resnet"), tune=False)
    with pytest.raises(error, match=r"plan: \w+ must be (an|a positive) int"):
        model.plan(*args)
    assert model.plan(np.int64(64), torch.tensor(64)) == model.plan(64, 64)


@pytest.mark.parametrize("built", [True, False])
def test_native_helper_notes_match_the_kernels(monkeypatch, built):
    """The Winograd tile transforms and the logits resize are noted as C exactly when the kernels run
    their C paths (Winograd forced onto the tiny head's 3x3 convs; C helpers present or not)."""
    if built and native.library() is None:
        pytest.skip("the C helpers do not build here")
    if not built:
        monkeypatch.setattr(native, "library", lambda: None)
    monkeypatch.setattr(dispatch, "WINOGRAD_WINS", ((1, 1),))
    wino: list = []
    sizes: list = []
    _spy(monkeypatch, winograd, "_conv3x3_winograd_native", wino)
    _spy(monkeypatch, resize, "_resize_bilinear_native", sizes, lambda out, x, h, w: (tuple(x.shape), (h, w)))
    model = upernet_fast.load(make_reference("convnext"), tune=False)
    plan = model.plan(64, 64)
    transforms = [p for p in plan if p["part"] == "Winograd tile transforms"]
    resized = [p for p in plan if p["part"] == "logits resize 16x16 -> 64x64"]
    assert len(transforms) == 1 and len(resized) == 1 and transforms[0]["layer"] == "decode_head"
    assert transforms[0]["impl"].startswith("C (") == bool(wino) == built
    assert resized[0]["impl"].startswith("C (") == (((1, 5, 16, 16), (64, 64)) in sizes) == built
    if not built:
        assert resized[0]["impl"] == "ATen upsample_bilinear2d" and "C helpers" in resized[0]["why"]
    exact = upernet_fast.load(make_reference("convnext"), tune=False, winograd=False).plan(64, 64)
    assert not any(p["part"] == "Winograd tile transforms" for p in exact)


@pytest.mark.parametrize("built", [True, False])
def test_bottleneck_sum_note_matches_the_kernel(monkeypatch, built):
    """Each split bottleneck's tail is noted as one C pass exactly when the C kernel runs it."""
    if built and native.library() is None:
        pytest.skip("the C helpers do not build here")
    if not built:
        monkeypatch.setattr(native, "library", lambda: None)
    ran: list = []
    _spy(monkeypatch, fpn, "_usa_sum_native", ran, lambda out, base, taps, relu: tuple(base.shape[2:]))
    plan = upernet_fast.load(make_reference("convnext"), tune=False).plan(64, 64)
    notes = {p["layer"]: p for p in plan if "upsampled group(s) + ReLU" in p["part"]}
    assert set(notes) == {"decode_head.bottleneck", "decode_head.fpn_bottleneck"}
    c_layers = {layer for layer, p in notes.items() if p["impl"].startswith("one C pass")}
    shapes = {"decode_head.fpn_bottleneck": (16, 16), "decode_head.bottleneck": (2, 2)}
    assert c_layers == {layer for layer, shape in shapes.items() if shape in ran}
    assert bool(c_layers) == built


@pytest.mark.parametrize(
    "x",
    [
        torch.randn(1, 5, 9, 11),
        torch.randn(1, 5, 9, 11).contiguous(memory_format=torch.channels_last),
        torch.randn(1, 5, 9, 11, dtype=torch.bfloat16),
    ],
    ids=["nchw", "channels_last", "bf16"],
)
def test_resize_choice_is_the_kernels_test(monkeypatch, x):
    """`dispatch.resize_choice` restates the test `kernels/resize.py` makes on its input: they agree."""
    calls: list = []
    _spy(monkeypatch, resize, "_resize_bilinear_native", calls)
    ops = dispatch.ops_for("torch", "cpu")
    impl, why = dispatch.resize_choice(ops, x)
    ops.resize_bilinear(x, (20, 30))
    assert impl.startswith("C (") == bool(calls), (impl, why)
