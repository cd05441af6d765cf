"""The model-level fast-path switches: Winograd on/off and its tile (dispatch.winograd_tile), the backend choice, and
`torch.compile(model, fullgraph=True)` through the registered ops, each against transformers."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch

import upernet_fast
from conftest import compare_logits, make_reference
from upernet_fast import dispatch

# the module, not the op of the same name that `upernet_fast.kernels` exports
conv_module = importlib.import_module("upernet_fast.kernels.conv_bn_relu")

REL_TOL = 1e-4  # as in test_model_parity: max |diff| <= REL_TOL x max |reference logit|


@pytest.fixture(scope="module")
def wide_reference():
    """A head wide enough (256 channels) for the Winograd rule to apply at level 0."""
    return make_reference("convnext", hidden_size=256, num_labels=7, auxiliary_channels=16)


def _count_winograd(monkeypatch) -> list[tuple]:
    calls: list[tuple] = []
    real = conv_module.conv3x3_winograd

    def spy(x, u, bias=None, relu=False, low=None):
        calls.append(tuple(x.shape) if u.shape[0] == 36 else ("F6", *x.shape))
        return real(x, u, bias, relu, low=low)

    monkeypatch.setattr(conv_module, "conv3x3_winograd", spy)
    return calls


def test_winograd_runs_on_wide_heads_and_matches(wide_reference, monkeypatch):
    monkeypatch.delenv(dispatch.WINOGRAD_ENV_VAR, raising=False)
    calls = _count_winograd(monkeypatch)
    x = torch.randn(2, 3, 75, 101, generator=torch.Generator().manual_seed(5))  # level 0: 18x25
    fast = upernet_fast.load(wide_reference)
    assert fast.winograd
    with torch.no_grad():
        ref = wide_reference(x).logits
        report = compare_logits(ref, fast(x).logits, REL_TOL)
    # dispatch.WINOGRAD_WINS at 256 channels: maps of 8x8 and up, i.e. fpn_convs[0] (18x25), fpn_convs[1]
    # (9x12) and fpn_bottleneck's level-0 group; not fpn_convs[2] (4x6) nor the PPM (40 input channels).
    assert calls == [(2, 256, 18, 25), (2, 256, 9, 12), (2, 256, 18, 25)], calls
    exact = upernet_fast.load(wide_reference, winograd=False)
    calls.clear()
    with torch.no_grad():
        exact_report = compare_logits(ref, exact(x).logits, REL_TOL)
    assert calls == []
    print(f"winograd {report} / exact {exact_report}")


def test_winograd_f6_on_large_maps_matches(wide_reference, monkeypatch):
    monkeypatch.delenv(dispatch.WINOGRAD_ENV_VAR, raising=False)
    calls = _count_winograd(monkeypatch)
    pairs: list[tuple] = []
    real_pair = dispatch.conv3x3_winograd_pair

    def pair_spy(x, x2, u, bias=None, relu=False):
        pairs.append((u.shape[0], tuple(x.shape), tuple(x2.shape)))
        return real_pair(x, x2, u, bias, relu)

    monkeypatch.setattr(dispatch, "conv3x3_winograd_pair", pair_spy)
    x = torch.randn(1, 3, 259, 263, generator=torch.Generator().manual_seed(7))  # level 0: 64x65
    with torch.no_grad():
        # float32 taps (bf16x3 off): a merge pays off against those (see the next test for bf16x3 taps)
        fast = upernet_fast.load(wide_reference, bf16x3=False)
        report = compare_logits(wide_reference(x).logits, fast(x).logits, REL_TOL)
    # level 0 (64x65) takes F(6x6): fpn_convs[0]; levels 1, 2 F(4x4) ...
    assert calls == [("F6", 1, 256, 64, 65), (1, 256, 32, 32), (1, 256, 16, 16)], calls
    # ... and fpn_bottleneck's level-0 group, with level 1 upsampled and merged into it (F(6x6), 2x up)
    assert pairs == [(64, (1, 256, 64, 65), (1, 256, 64, 65))], pairs
    print(f"F(6x6) model {report}")


def test_merge_rule_counts_bf16x3_taps():
    """A 2x-upsampled group merges into an F(6x6) conv against float32 taps (9 vs 7.1 GEMM rows per
    low-resolution pixel), not against bf16x3 taps (9 / 1.5 = 6); never with F(4x4) or 4x upsampling."""
    assert dispatch.merge_into_winograd(6, (64, 64), (128, 128))
    assert not dispatch.merge_into_winograd(6, (64, 64), (128, 128), taps_bf16x3=True)
    assert not dispatch.merge_into_winograd(4, (64, 64), (128, 128))
    assert not dispatch.merge_into_winograd(6, (32, 32), (128, 128))
    assert not dispatch.merge_into_winograd(0, (64, 64), (128, 128))


@pytest.mark.skipif(not dispatch.amx_bf16(), reason="bf16x3 taps need a CPU with AMX-BF16")
def test_bf16x3_taps_stay_unmerged_and_match(wide_reference, monkeypatch):
    monkeypatch.delenv(dispatch.WINOGRAD_ENV_VAR, raising=False)
    pairs: list[tuple] = []
    monkeypatch.setattr(dispatch, "conv3x3_winograd_pair", lambda *a, **k: pairs.append(a))
    x = torch.randn(1, 3, 259, 263, generator=torch.Generator().manual_seed(7))  # level 1: 32x32
    fast = upernet_fast.load(wide_reference, bf16x3=True, tune=False)
    with torch.no_grad():
        report = compare_logits(wide_reference(x).logits, fast(x).logits, REL_TOL)
    assert pairs == []
    notes = {row["part"]: row["impl"] for row in fast.plan(259, 263)}
    assert "bf16x3" in notes["taps0_32x32: 256->2304 1x1 @ 32x32, torch.float32"], notes
    print(f"unmerged bf16x3 taps {report}")


def test_winograd_tile_rule():
    """F(6x6) from WINOGRAD_F6_MIN_SIDE, F(4x4) below, none where the table says the exact conv wins."""
    ops = dispatch.ops_for("torch", "cpu", winograd=True)
    w = torch.empty(512, 512, 3, 3)
    side = dispatch.WINOGRAD_F6_MIN_SIDE
    assert dispatch.winograd_tile(ops, torch.empty(1, 512, side, side + 5), w, 1) == 6
    assert dispatch.winograd_tile(ops, torch.empty(1, 512, side - 1, 300), w, 1) == 4
    assert dispatch.winograd_tile(ops, torch.empty(1, 512, 7, 7), w, 1) == 0
    assert dispatch.winograd_tile(ops, torch.empty(1, 512, 64, 64), w, 0) == 0
    assert dispatch.winograd_tile(ops, torch.empty(1, 512, 64, 64, dtype=torch.float64), w, 1) == 0
    assert (
        dispatch.winograd_tile(
            dispatch.ops_for("torch", "cpu", winograd=False), torch.empty(1, 512, 64, 64), w, 1
        )
        == 0
    )


def test_winograd_env_switch(wide_reference, monkeypatch):
    monkeypatch.setenv(dispatch.WINOGRAD_ENV_VAR, "0")
    assert not upernet_fast.load(wide_reference).winograd
    monkeypatch.setenv(dispatch.WINOGRAD_ENV_VAR, "maybe")
    with pytest.raises(ValueError, match="UPERNET_FAST_WINOGRAD='maybe'"):
        upernet_fast.load(wide_reference)


def test_backend_env_default_and_triton_needs_interpreter(monkeypatch):
    ref = make_reference("convnext")
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    assert upernet_fast.load(ref).backend == "torch"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    fast = upernet_fast.load(ref, backend="triton")  # a valid name; it can only run under the interpreter
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        fast(torch.randn(1, 3, 64, 64))


@pytest.mark.slow
@pytest.mark.parametrize("compile_eager", [False, True], ids=["traced", "eager-op"])
def test_compile_fullgraph_matches_eager_and_reference(compile_eager):
    """Traced (the plain ops, for Inductor: what torch.export sees) or, the CPU default, the eager forward as
    one op: both compile with fullgraph=True and match eager and transformers."""
    ref = make_reference("convnext")
    fast = upernet_fast.load(ref, backend="torch")
    fast.compile_eager = compile_eager
    x = torch.randn(2, 3, 97, 131, generator=torch.Generator().manual_seed(6))
    torch._dynamo.reset()
    compiled = torch.compile(fast, fullgraph=True)
    with torch.no_grad():
        eager, out = fast(x).logits, compiled(x).logits
        compare_logits(eager, out, 1e-5)
        compare_logits(ref(x).logits, out, REL_TOL)
        if compile_eager:  # the same computation, bit for bit
            assert torch.equal(eager, out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compile_runs_the_eager_forward_on_cpu(dtype):
    """By default torch.compile runs the eager forward as one op on CPU: the same logits bit for bit (a bf16
    model's float32 logits too), as a tuple with return_dict=False; a copy runs itself, not the original;
    hidden states still go through the traced graph. Switched off (`compile_eager = False` or
    UPERNET_FAST_COMPILE_EAGER=0), the traced graph runs."""
    ref, other = make_reference("swin", seed=1), make_reference("swin", seed=2)
    fast = upernet_fast.load(ref, dtype=dtype)
    assert fast.compile_eager
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(9)).to(dtype)
    torch._dynamo.reset()
    with torch.no_grad():
        eager = fast(x).logits
        compiled = torch.compile(fast, fullgraph=True)
        out = compiled(x).logits
        assert out.dtype == eager.dtype == torch.float32 and torch.equal(out, eager)
        (as_tuple,) = compiled(x, return_dict=False)
        assert torch.equal(as_tuple, eager)
        copy_ = copy.deepcopy(fast)
        copy_.load_state_dict(upernet_fast.load(other, dtype=dtype).state_dict())
        assert torch.equal(torch.compile(copy_)(x).logits, copy_(x).logits)
        assert not torch.equal(copy_(x).logits, eager)
        hidden = compiled(x, output_hidden_states=True)
        assert hidden.hidden_states is not None
        if dtype == torch.float32:
            compare_logits(eager, hidden.logits, 1e-5)
        else:  # traced bf16: plain ops, folds from the bf16 parameters
            compare_logits(eager, hidden.logits, 0.05, min_agree=0.99)


def test_model_pickled_before_the_compile_switch_gets_it(monkeypatch):
    """A model pickled by a version without `compile_eager` unpickles with the switch's default and a key
    of its own for the compiled op."""
    fast = upernet_fast.load(make_reference("convnext"))
    state = fast.__getstate__()
    del state["compile_eager"]
    monkeypatch.setenv(dispatch.COMPILE_EAGER_ENV_VAR, "0")
    old = upernet_fast.FastUperNet.__new__(upernet_fast.FastUperNet)
    old.__setstate__(state)
    assert old.compile_eager is False and old._model_key != fast._model_key


def test_compile_eager_switch(monkeypatch):
    monkeypatch.setenv(dispatch.COMPILE_EAGER_ENV_VAR, "0")
    assert not upernet_fast.load(make_reference("convnext")).compile_eager
    assert not dispatch.eager_under_compile(True, torch.device("meta"))  # only CPU was measured
    monkeypatch.setenv(dispatch.COMPILE_EAGER_ENV_VAR, "maybe")
    with pytest.raises(ValueError, match="UPERNET_FAST_COMPILE_EAGER"):
        upernet_fast.load(make_reference("convnext"))


@pytest.mark.slow
@pytest.mark.parametrize("compile_eager", [False, True], ids=["traced", "eager-op"])
def test_compiled_model_follows_load_state_dict(compile_eager):
    """A traced compiled model takes the folded weights as constants: load_state_dict must drop them, or it
    keeps computing with the old weights (seen: argmax agreement 3.5%)."""
    ref, other = make_reference("convnext", seed=1), make_reference("convnext", seed=2)
    fast = upernet_fast.load(ref)
    fast.compile_eager = compile_eager
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(7))
    torch._dynamo.reset()
    compiled = torch.compile(fast)
    with torch.no_grad():
        compare_logits(ref(x).logits, compiled(x).logits, REL_TOL)
        fast.load_state_dict(other.state_dict())
        compare_logits(other(x).logits, compiled(x).logits, REL_TOL)
        compare_logits(other(x).logits, fast(x).logits, REL_TOL)


def test_edits_through_data_need_clear_cached_weights():
    """`.data` edits bypass the version counters the derived-weight caches key on: clear_cached_weights()
    is the documented way to make the model see them (in-place edits under no_grad are seen by themselves)."""
    ref = make_reference("convnext", seed=3)
    fast = upernet_fast.load(ref)
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        fast(x)
        for model in (ref, fast):
            model.decode_head.fpn_bottleneck.batch_norm.weight.data.mul_(1.5)
        fast.clear_cached_weights()
        compare_logits(ref(x).logits, fast(x).logits, REL_TOL)
        for model in (ref, fast):
            model.decode_head.fpn_bottleneck.conv.weight.mul_(0.5)  # a versioned edit: seen without clearing
        compare_logits(ref(x).logits, fast(x).logits, REL_TOL)


def test_derived_weight_caches_stay_bounded_over_many_input_sizes():
    """Size-dependent derived weights (oneDNN prepacks, the head's taps) used to pile up per input size."""
    from upernet_fast.folding import MAX_ENTRIES

    fast = upernet_fast.load(make_reference("convnext", seed=4), tune=False)
    with torch.no_grad():
        for i in range(3 * MAX_ENTRIES):
            fast(torch.randn(1, 3, 64 + 8 * (i % 12), 64 + 8 * (i // 12)))
    for name, module in fast.named_modules():
        entries = [k for k in module.__dict__ if k.startswith("_folded_")]
        assert len(entries) <= MAX_ENTRIES, (name, len(entries))


def test_no_top_level_kernels_module_from_a_checkout(monkeypatch):
    """transformers probes the top-level name `kernels` (Hugging Face's package): the kernel layer lives
    inside the package (`upernet_fast/kernels`), so a checkout on sys.path never offers that name."""
    import importlib.util
    from pathlib import Path

    root = Path(upernet_fast.__file__).resolve().parent.parent
    monkeypatch.syspath_prepend(str(root))
    spec = importlib.util.find_spec("kernels")
    assert spec is None or root not in Path(spec.origin or "").resolve().parents
    assert upernet_fast.kernels.__name__ == "upernet_fast.kernels"


@pytest.mark.parametrize("kind", ["convnext", "swin", "resnet"])
def test_logits_layout_like_transformers(kind):
    """Same strides as transformers' logits (NCHW-contiguous): code that calls .view() on them keeps working."""
    ref = make_reference(kind)
    x = torch.randn(1, 3, 61, 79, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        want, got = ref(x).logits, upernet_fast.load(ref)(x).logits
    assert got.is_contiguous() and got.stride() == want.stride()


@pytest.mark.parametrize("kind", ["convnext", "swin", "resnet"])
def test_deepcopy_and_pickle_after_a_call(kind):
    """oneDNN's prepacked weights (in the derived-weight caches after a call) cannot be copied or pickled,
    and ConvNeXt's activations were lambdas: both used to fail."""
    import copy
    import io

    ref = make_reference(kind, seed=5)
    fast = upernet_fast.load(ref)
    x = torch.randn(1, 3, 64, 96, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        expected = ref(x).logits
        fast(x)
        buffer = io.BytesIO()
        torch.save(fast, buffer)
        buffer.seek(0)
        for model in (copy.deepcopy(fast), torch.load(buffer, weights_only=False), fast):
            compare_logits(expected, model(x).logits, REL_TOL)
