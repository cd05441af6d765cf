"""bfloat16 inference: `model.to(torch.bfloat16)` / `load(..., dtype=torch.bfloat16)` against transformers.

The bar is transformers' own bf16 model: against the float32 reference, our bf16 logits must agree on the
argmax at least as often as transformers-bf16's do (a small slack for these tiny random models, where one
pixel is 0.03%), and stay within a bf16-sized relative error. Logits come back as float32 (the classifier
output is widened; the resize runs in float32)."""

from __future__ import annotations

import copy

import pytest
import torch

import upernet_fast
from conftest import make_reference
from upernet_fast import dispatch
from upernet_fast.backbones import convnext

SLACK = 0.003  # argmax agreement may trail transformers-bf16's by at most this fraction of pixels
REL_TOL = 0.05  # max |logit diff| / max |logit| against fp32 (bf16 keeps 8 bits: ~0.4% per rounding)


def _agreement(ref: torch.Tensor, out: torch.Tensor) -> float:
    return (ref.argmax(1) == out.float().argmax(1)).float().mean().item()


@pytest.mark.parametrize(
    "kind,size,batch",
    [("convnext", (97, 131), 2), ("swin", (75, 101), 1), ("resnet", (64, 96), 1)],
)
def test_bf16_agrees_with_fp32_at_least_like_transformers_bf16(kind, size, batch):
    ref = make_reference(kind, hidden_size=64, num_labels=19)
    x = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(1))
    fast = upernet_fast.load(ref).to(torch.bfloat16)
    ref_bf16 = copy.deepcopy(ref).to(torch.bfloat16)
    with torch.no_grad():
        expected = ref(x).logits
        theirs = ref_bf16(x.bfloat16()).logits
        ours = fast(x.bfloat16()).logits
    assert ours.dtype == torch.float32 and ours.shape == expected.shape
    assert ours.is_contiguous()
    rel = ((ours - expected).abs().max() / expected.abs().max()).item()
    assert rel <= REL_TOL, f"bf16 logits differ by {rel:.3g} of the logit scale"
    ours_agree, theirs_agree = _agreement(expected, ours), _agreement(expected, theirs)
    assert ours_agree >= theirs_agree - SLACK, (ours_agree, theirs_agree)


def test_bf16_head_is_the_fast_one_and_matches_its_plain_composition():
    """The bf16 head (low-resolution rewrite, float32 accumulation of the upsampled groups) equals the
    plain bf16 composition of transformers' head applied to the same backbone features, to bf16 error."""
    ref = make_reference("convnext", hidden_size=64, num_labels=7)
    fast = upernet_fast.load(ref).to(torch.bfloat16)
    x = torch.randn(1, 3, 70, 90).bfloat16()
    with torch.no_grad():
        feats = fast.backbone(x).feature_maps
        ours = fast.decode_head(feats, fast.ops_for())
        theirs = copy.deepcopy(ref.decode_head).double()([f.double() for f in feats])
    assert ours.dtype == torch.float32
    rel = ((ours.double() - theirs).abs().max() / theirs.abs().max()).item()
    assert rel <= REL_TOL, rel


def test_bf16_onednn_convs_use_prepacked_weights(monkeypatch):
    """In eager bf16 inference the oneDNN convs (the head's 3x3 convs, ConvNeXt's MLP 1x1 convs) run on
    weights prepacked once in oneDNN's layout; the logits are bitwise those of the dense weights."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN in this PyTorch build")
    ref = make_reference("convnext", hidden_size=64, num_labels=7)
    fast = upernet_fast.load(ref, dtype=torch.bfloat16)
    x = torch.randn(1, 3, 70, 90).bfloat16()
    with torch.no_grad():
        ours = fast(x).logits
    packed = [
        (name, slot)
        for name, module in fast.named_modules()
        for slot, entry in vars(module).items()
        if slot.startswith(("_folded_onednn_", "_folded_mlp_onednn_"))
        and any(
            getattr(t, "layout", None) == torch._mkldnn
            for t in (entry[1] if isinstance(entry[1], tuple) else [entry[1]])
        )
    ]
    if not dispatch.native_bf16():
        assert not any("bfloat16" in slot for _, slot in packed), packed
        pytest.skip("no native bf16 on this CPU: oneDNN refuses bf16 convs, so none are prepacked (checked)")
    assert any("fpn_convs" in name for name, _ in packed), packed
    assert any("layers" in name for name, _ in packed), packed
    for _, module in fast.named_modules():  # drop them: the same forward on dense weights
        for slot in [s for s in vars(module) if s.startswith(("_folded_onednn_", "_folded_mlp_onednn_"))]:
            delattr(module, slot)
    monkeypatch.setattr(dispatch, "onednn_prepacked", lambda w, *a: w)
    monkeypatch.setattr(convnext, "onednn_prepacked", lambda w, *a: w)
    with torch.no_grad():
        dense = fast(x).logits
    assert torch.equal(ours, dense)


def test_load_with_bf16_dtype():
    ref = make_reference("convnext")
    model = upernet_fast.load(ref, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64).bfloat16()).logits
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_emulated_bf16_warns_once(monkeypatch):
    ref = make_reference("convnext")
    model = upernet_fast.load(ref).to(torch.bfloat16)
    monkeypatch.setattr(dispatch, "native_bf16", lambda: False)
    monkeypatch.setattr(dispatch, "_warned_emulated", set())
    x = torch.randn(1, 3, 64, 64).bfloat16()
    with pytest.warns(RuntimeWarning, match="no native bfloat16"):
        model(x)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(x)  # once per process


def test_bf16_pyramid_pooling_runs_in_float32():
    """In a bf16 model the PPM (smallest map; its error reaches every level) is computed in float32 from the
    model's own bf16 parameters: it equals transformers' PPM in float64 on the same (bf16-valued) weights
    to float32 error, far inside one bf16 rounding, and comes back in bf16."""
    ref = make_reference("swin", hidden_size=64, num_labels=7)
    fast = upernet_fast.load(ref).to(torch.bfloat16)
    ref_bf16_weights = copy.deepcopy(ref).to(torch.bfloat16).double()  # the bf16 model's values, exactly
    x = torch.randn(1, fast.decode_head.in_channels[-1], 9, 11).bfloat16()
    with torch.no_grad():
        ours = fast.decode_head.psp_forward(x, fast.ops_for())
        theirs = ref_bf16_weights.decode_head.psp_forward([x.double()])
    assert ours.dtype == torch.bfloat16
    rel = ((ours.double() - theirs).abs().max() / theirs.abs().max()).item()
    assert rel <= 2**-8, rel  # one bf16 rounding of the output (a bf16 PPM misses by several)
