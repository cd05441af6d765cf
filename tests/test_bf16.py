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


@pytest.mark.parametrize("cast_from_float32", [True, False])
def test_bf16_pyramid_pooling_runs_in_float32(cast_from_float32):
    """In a bf16 model the PPM (smallest map; its error reaches every level) is computed in float32, its
    weights folded from the float32 checkpoint's values where the model was cast from them (`_apply`), else
    from the model's own bf16 parameters (a bf16 checkpoint): it equals transformers' PPM in float64 on
    those same weights to float32 error, far inside one bf16 rounding, and comes back in bf16."""
    ref = make_reference("swin", hidden_size=64, num_labels=7)
    fast = upernet_fast.load(ref).to(torch.bfloat16)
    if not cast_from_float32:  # as if loaded from a bf16 checkpoint: the parameters are all there is
        fast = upernet_fast.load(copy.deepcopy(ref).to(torch.bfloat16))
        assert fast.dtype == torch.bfloat16 and fast._precise_keys == []
    weights = copy.deepcopy(ref) if cast_from_float32 else copy.deepcopy(ref).to(torch.bfloat16)
    x = torch.randn(1, fast.decode_head.in_channels[-1], 9, 11).bfloat16()
    with torch.no_grad():
        ours = fast.decode_head.psp_forward(x, fast.ops_for())
        theirs = weights.double().decode_head.psp_forward([x.double()])
    assert ours.dtype == torch.bfloat16
    rel = ((ours.double() - theirs).abs().max() / theirs.abs().max()).item()
    assert rel <= 2**-8, rel  # one bf16 rounding of the output (a bf16 PPM misses by several)


def _fold32(module, dtype, running_mean=None):
    """transformers `module`'s (conv, BN) folded from its float32 values in float64, cast once to `dtype`."""
    from upernet_fast.folding import fold_batchnorm_tensors

    bn = module.batch_norm
    mean = bn.running_mean if running_mean is None else running_mean
    return fold_batchnorm_tensors(
        module.conv.weight, None, bn.weight, bn.bias, mean, bn.running_var, bn.eps, dtype
    )


def test_bf16_folds_round_once_from_the_float32_checkpoint():
    """A float32 model cast to bf16 (`load(..., dtype=torch.bfloat16)`, `.bfloat16()`) folds its BatchNorms
    from the float32 values, rounding once, not again from its own rounded parameters (0.1-0.5% more
    argmax agreement on ConvNeXt-T, bench/results/decisions.md). The float32 originals stay while the
    parameters are unchanged, so the model computes the same after its folds are rebuilt (a deepcopy or
    torch.save clears them) and a copy or a reloaded model computes the same too."""
    import io

    from upernet_fast import folding

    ref = make_reference("convnext", hidden_size=64, num_labels=19)
    x = torch.randn(1, 3, 64, 96).bfloat16()
    casts = (
        upernet_fast.load(ref, dtype=torch.bfloat16),
        upernet_fast.load(ref).bfloat16().to("cpu"),  # a later no-op move keeps the originals
    )
    for fast in casts:
        kept = list(fast._precise_keys)
        assert kept and all(k in folding._PRECISE for k in kept)
        with torch.no_grad():
            first = fast(x).logits
            copied = copy.deepcopy(fast)  # clears fast's folds, as torch.save does
            buffer = io.BytesIO()
            torch.save(fast, buffer)
            buffer.seek(0)
            reloaded = torch.load(buffer, weights_only=False)
            again = fast(x).logits  # folds rebuilt
        assert fast._precise_keys == kept and copied._precise_keys and reloaded._precise_keys
        for other in (copied, reloaded):
            with torch.no_grad():
                assert torch.equal(other(x).logits, first)
        assert torch.equal(again, first)
        for name in ("fpn_bottleneck", "lateral_convs.0", "fpn_convs.1"):
            ours = fast.decode_head.get_submodule(name).folded()
            expected = _fold32(ref.decode_head.get_submodule(name), torch.bfloat16)
            assert all(torch.equal(a, b) for a, b in zip(ours, expected, strict=True)), name
        twice = _fold32(copy.deepcopy(ref).bfloat16().decode_head.fpn_bottleneck, torch.bfloat16)
        assert not torch.equal(twice[1], fast.decode_head.fpn_bottleneck.folded()[1])  # the test can fail
        cls = fast.decode_head._folded_classifier_fp32[1]  # the float32 classifier of the bf16 head
        assert torch.equal(cls[0], ref.decode_head.classifier.weight)
        assert torch.equal(cls[1], ref.decode_head.classifier.bias)
        fast.clear_cached_weights()  # "the parameters are the truth now": the originals go
        assert fast._precise_keys == [] and not any(k in folding._PRECISE for k in kept)


@pytest.mark.parametrize(
    "how", ["in place", ".data + clear_cached_weights", "load_state_dict in inference mode"]
)
def test_bf16_folds_see_edits_made_after_the_cast(how):
    """A parameter changed after the cast is folded as changed: its original no longer applies. In-place
    edits bump the version counter; `.data` edits do not, and `clear_cached_weights()` (the documented
    step after them) drops the originals; `load_state_dict` drops them too, also in inference mode (where
    `load` still makes normal tensors, which keep their originals)."""
    ref = make_reference("convnext", hidden_size=64, num_labels=19)
    x = torch.randn(1, 3, 64, 64).bfloat16()
    if how == "load_state_dict in inference mode":
        with torch.inference_mode():
            fast = upernet_fast.load(ref, dtype=torch.bfloat16)
            assert fast._precise_keys
            state = {k: v.clone() for k, v in fast.state_dict().items()}
            state["decode_head.fpn_bottleneck.batch_norm.running_mean"] += 0.5
            fast(x)
            fast.load_state_dict(state)
            fast(x)
    else:
        fast = upernet_fast.load(ref, dtype=torch.bfloat16)
        with torch.no_grad():
            fast(x)
            bn = fast.decode_head.fpn_bottleneck.batch_norm
            if how == "in place":
                bn.running_mean.add_(0.5)
            else:
                bn.running_mean.data.add_(0.5)
                fast.clear_cached_weights()
            fast(x)
    mean = fast.decode_head.fpn_bottleneck.batch_norm.running_mean
    module = fast.decode_head.fpn_bottleneck
    ours = module.folded()
    if how == "in place":  # the other sources still fold from their float32 originals
        expected = _fold32(ref.decode_head.fpn_bottleneck, torch.bfloat16, running_mean=mean)
    else:  # the model's own bf16 parameters are the truth
        expected = _fold32(module, torch.bfloat16)
    assert all(torch.equal(a, b) for a, b in zip(ours, expected, strict=True))
    assert not torch.equal(ours[1], _fold32(ref.decode_head.fpn_bottleneck, torch.bfloat16)[1])


def test_float16_after_bfloat16_still_folds_the_float32_values():
    """Casts chain: bf16 then float16 (more mantissa bits than bf16) folds from the float32 originals."""
    ref = make_reference("convnext", hidden_size=64, num_labels=19)
    fast = upernet_fast.load(ref, dtype=torch.bfloat16).to(torch.float16)
    ours = fast.decode_head.fpn_bottleneck.folded()
    expected = _fold32(ref.decode_head.fpn_bottleneck, torch.float16)
    assert all(torch.equal(a, b) for a, b in zip(ours, expected, strict=True))
