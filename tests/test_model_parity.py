"""FastUperNet against transformers' UperNetForSemanticSegmentation (random non-trivial weights).

fp32 tolerance: max |logit difference| <= 1e-4 x max |reference logit| (the fast path reorders sums:
BatchNorm folding, the low-resolution bottleneck rewrite), and argmax agreement >= 99.9%.
"""

from __future__ import annotations

import pytest
import torch

import upernet_fast
from conftest import FOUR, compare_logits, make_reference

REL_TOL = 1e-4
BACKBONES = ["convnext", "swin", "resnet"]


def _pair(kind: str, **kwargs):
    ref = make_reference(kind, **kwargs)
    return ref, upernet_fast.load(ref)


@pytest.mark.parametrize("kind", BACKBONES)
@pytest.mark.parametrize("size", [(97, 131), (64, 64)])
def test_logits_match_four_levels(kind, size):
    ref, fast = _pair(kind)
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        report = compare_logits(ref(x).logits, fast(x).logits, REL_TOL)
    print(f"{kind} {size}: {report}")


@pytest.mark.parametrize("kind", BACKBONES)
@pytest.mark.parametrize("stages", [["stage2", "stage3", "stage4"], ["stage1", "stage2", "stage3"]])
def test_three_level_backbones(kind, stages):
    ref, fast = _pair(kind, out_features=stages)
    assert len(fast.decode_head.lateral_convs) == 2
    x = torch.randn(1, 3, 75, 120, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        compare_logits(ref(x).logits, fast(x).logits, REL_TOL)


@pytest.mark.parametrize("kind", BACKBONES)
@pytest.mark.parametrize("stages", [["stage4"], ["stage2", "stage4"]])
def test_one_and_two_level_backbones(kind, stages):
    """One level: the PPM output alone feeds fpn_bottleneck (no laterals, no FPN convs)."""
    ref, fast = _pair(kind, out_features=stages, use_auxiliary_head=False)
    x = torch.randn(2, 3, 64, 97, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        compare_logits(ref(x).logits, fast(x).logits, REL_TOL)


@pytest.mark.parametrize("kind", ["convnext", "swin"])
def test_loaded_inside_inference_mode(kind, tmp_path):
    """`load` inside torch.inference_mode() still makes normal tensors (a cast keeps its float32 originals for
    the folds: inference tensors have no version counter), usable after it. A model built there by hand
    has inference-tensor parameters: the folded-weight cache must work for those too, and casting them
    (inside inference mode, where `_apply` makes normal tensors) must not fail."""
    ref = make_reference(kind)
    ref.save_pretrained(tmp_path)
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(6))
    outside, to_cast = upernet_fast.load(ref, dtype=torch.bfloat16), upernet_fast.load(ref)
    with torch.inference_mode():
        expected = ref(x).logits
        from_dir, from_module = upernet_fast.load(tmp_path), upernet_fast.load(ref)
        assert not any(p.is_inference() for p in from_dir.parameters())
        compare_logits(expected, from_dir(x).logits, REL_TOL)
        cast = upernet_fast.load(ref, dtype=torch.bfloat16)
        assert cast._precise_keys
        assert torch.equal(cast(x.bfloat16()).logits, outside(x.bfloat16()).logits)
        to_cast.bfloat16()  # cast in there: `_apply` makes normal tensors, which keep their originals
        assert to_cast._precise_keys and not next(to_cast.parameters()).is_inference()
        assert torch.equal(to_cast(x.bfloat16()).logits, outside(x.bfloat16()).logits)
        by_hand = upernet_fast.FastUperNet.from_config(ref.config).eval()
        by_hand.load_state_dict(ref.state_dict())
        assert next(by_hand.parameters()).is_inference()
        compare_logits(expected, by_hand(x).logits, REL_TOL)
        assert torch.isfinite(by_hand.bfloat16()(x.bfloat16()).logits).all()
    with torch.no_grad():
        compare_logits(expected, from_module(x).logits, REL_TOL)
        compare_logits(expected, from_dir(x).logits, REL_TOL)


@pytest.mark.parametrize("kind", BACKBONES)
def test_non_default_head(kind):
    ref, fast = _pair(kind, hidden_size=24, pool_scales=[1, 3, 5, 9], num_labels=11, use_auxiliary_head=False)
    assert fast.auxiliary_head is None
    x = torch.randn(1, 3, 83, 70, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        compare_logits(ref(x).logits, fast(x).logits, REL_TOL)


def test_swin_window_12_and_padding():
    ref, fast = _pair("swin", backbone_overrides=dict(window_size=12))
    x = torch.randn(1, 3, 101, 150, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        compare_logits(ref(x).logits, fast(x).logits, REL_TOL)


@pytest.mark.parametrize("kind", BACKBONES)
def test_loss_parity(kind):
    ref, fast = _pair(kind, loss_ignore_index=3)
    x = torch.randn(2, 3, 65, 79, generator=torch.Generator().manual_seed(5))
    labels = torch.randint(0, 5, (2, 65, 79), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = ref(x, labels=labels).loss
        got = fast(x, labels=labels).loss
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_auxiliary_head_variants_loss():
    ref, fast = _pair(
        "convnext", auxiliary_num_convs=2, auxiliary_concat_input=True, auxiliary_loss_weight=0.7
    )
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(7))
    labels = torch.randint(0, 5, (1, 64, 96), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        torch.testing.assert_close(
            fast(x, labels=labels).loss, ref(x, labels=labels).loss, rtol=1e-5, atol=1e-6
        )


@pytest.mark.parametrize("kind", BACKBONES)
def test_hidden_states_and_tuples(kind):
    ref, fast = _pair(kind)
    x = torch.randn(1, 3, 70, 90, generator=torch.Generator().manual_seed(9))
    labels = torch.randint(0, 5, (1, 70, 90), generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        r = ref(x, output_hidden_states=True)
        f = fast(x, output_hidden_states=True)
        assert len(f.hidden_states) == len(r.hidden_states)
        for a, b in zip(r.hidden_states, f.hidden_states, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * a.abs().max().item())
        rt = ref(x, labels=labels, output_hidden_states=True, return_dict=False)
        ft = fast(x, labels=labels, output_hidden_states=True, return_dict=False)
        assert isinstance(ft, tuple) and len(ft) == len(rt)
        torch.testing.assert_close(ft[0], rt[0], rtol=1e-5, atol=1e-6)  # loss first
        assert len(fast(x, return_dict=False)) == len(ref(x, return_dict=False)) == 1
    out = fast(x)
    assert out["logits"] is out.logits and out[0] is out.logits and out.loss is None


def test_swin_attentions():
    """transformers' default (sdpa) backbone returns no attention weights; its eager one does, as we do."""
    ref, fast = _pair("swin")
    ref.set_attn_implementation("eager")
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        r = ref(x, output_attentions=True)
        f = fast(x, output_attentions=True)
        compare_logits(r.logits, f.logits, REL_TOL)
    assert r.attentions is not None and len(f.attentions) == len(r.attentions)
    for a, b in zip(r.attentions, f.attentions, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_hub_sized_convnext_tiny():
    """The openmmlab/upernet-convnext-tiny architecture (150 classes, 512 hidden) at a moderate size."""
    torch.manual_seed(0)
    bb = dict(hidden_sizes=[96, 192, 384, 768], depths=[3, 3, 9, 3], drop_path_rate=0.3)
    ref = make_reference(
        "convnext", backbone_overrides=bb, hidden_size=512, num_labels=150, auxiliary_channels=256
    )
    fast = upernet_fast.load(ref)
    x = torch.randn(1, 3, 192, 256, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        report = compare_logits(ref(x).logits, fast(x).logits, REL_TOL)
    print(f"convnext-tiny 192x256: {report}")


def test_out_features_default_four():
    ref, fast = _pair("convnext", out_features=FOUR)
    assert fast.backbone.channels == list(ref.backbone.channels)
