"""Measured implementation choices (upernet_fast.tuning): the calibration itself, its cache, the switch,
the plan printout, and parity with transformers for every plan the calibration can pick."""

from __future__ import annotations

import json

import pytest
import torch

import upernet_fast
from conftest import compare_logits, make_reference
from upernet_fast import dispatch, tuning
from upernet_fast.kernels import native
from upernet_fast.kernels._common import native_bf16
from upernet_fast.kernels.gemm_bf16x3 import gemm_bf16bf16f32

REL_TOL = 1e-4


@pytest.fixture
def tuning_cache(monkeypatch, tmp_path):
    monkeypatch.setenv(native.CACHE_ENV_VAR, str(tmp_path))
    tuning._table.cache_clear()
    yield tmp_path
    tuning._table.cache_clear()


@pytest.fixture(scope="module")
def wide_reference():
    return make_reference("convnext", hidden_size=128, num_labels=7, auxiliary_channels=16)


def test_calibration_measures_once_and_is_cached_per_machine(tuning_cache, monkeypatch, capsys):
    calls = []
    real = tuning.measure_conv3x3

    def spy(*args):
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(tuning, "measure_conv3x3", spy)
    assert tuning.winograd_tile(8, 8, 20, 20) == (-1, "too small to time reliably")
    assert calls == []
    gemm, gemm_why = tuning.gemm_1x1(256, 512, 40, 40, torch.float32)
    assert isinstance(gemm, bool) and gemm_why.startswith("measured on this CPU")
    assert "tuned conv1x1:256->512@40x40:float32" in capsys.readouterr().err
    tile, why = tuning.winograd_tile(64, 64, 20, 300)  # width capped at CAP
    assert tile in tuning.CANDIDATES and why.startswith("measured on this CPU")
    assert calls == [(64, 64, 20, tuning.CAP)]
    assert "tuned conv3x3:64->64@20x128" in capsys.readouterr().err  # the progress line
    assert tuning.winograd_tile(64, 64, 20, 500) == (tile, why)  # same bucket: no new measurement
    assert len(calls) == 1
    (path,) = tuning_cache.glob("tuning-*.json")
    data = json.loads(path.read_text())
    assert data["machine"] == tuning.machine_key()
    entry = data["entries"]["conv3x3:64->64@20x128"]
    assert entry["choice"] == tile and str(tile) in entry["ms"]
    fastest = min(entry["ms"], key=entry["ms"].get)  # the measured winner, unless within MARGIN of the rule's
    assert entry["ms"][str(tile)] <= (1 + tuning.MARGIN) * entry["ms"][fastest]
    # A new process (fresh in-memory table) reads the file instead of measuring.
    tuning._table.cache_clear()
    assert tuning.winograd_tile(64, 64, 20, 300)[0] == tile and len(calls) == 1
    # Another machine key (e.g. thread count) is another file: never reused across machines.
    monkeypatch.setattr(tuning, "machine_key", lambda: {**data["machine"], "threads": 99})
    assert tuning.cache_path() != path


def test_tune_switch_uses_the_default_rules(monkeypatch):
    monkeypatch.setattr(tuning, "winograd_tile", lambda *a: pytest.fail("measured with tuning off"))
    ops = dispatch.ops_for("torch", "cpu", winograd=True, tune=False)
    tile, why = dispatch.winograd_choice(ops, torch.empty(1, 512, 64, 64), torch.empty(512, 512, 3, 3), 1)
    assert (tile, why.split(":")[0]) == (6, "default rule")
    monkeypatch.setenv(dispatch.TUNE_ENV_VAR, "0")
    assert upernet_fast.load(make_reference("convnext")).tune is False
    monkeypatch.setenv(dispatch.TUNE_ENV_VAR, "sometimes")
    with pytest.raises(ValueError, match="UPERNET_FAST_TUNE='sometimes' is not a switch"):
        upernet_fast.load(make_reference("convnext"))


@pytest.mark.parametrize(
    "forced,gemm,split",
    [(0, False, False), (0, True, True), (4, True, False), (6, False, False), (6, True, False)],
)
def test_every_plan_the_calibration_can_pick_matches_transformers(
    wide_reference, monkeypatch, forced, gemm, split
):
    """Whatever the measurements say on a machine, the model stays within tolerance: force each
    candidate for every tuned conv (3x3 algorithm, direct 3x3 in float32 or bf16x3, 1x1 as GEMM, oneDNN or
    bf16x3)
    and compare with transformers. bf16x3 is forced wherever oneDNN has native bf16 (not only with AMX)."""
    if split:
        if not native_bf16():
            pytest.skip("oneDNN has no native bfloat16 convs on this CPU")
        monkeypatch.setattr(dispatch, "amx_bf16", lambda: True)
    monkeypatch.setattr(tuning, "winograd_tile", lambda *a: (forced, f"forced {forced}"))
    monkeypatch.setattr(tuning, "gemm_1x1", lambda *a: (gemm, f"forced gemm {gemm}"))
    monkeypatch.setattr(tuning, "bf16x3", lambda *a: (split, f"forced split {split}"))
    fast = upernet_fast.load(wide_reference, tune=True)
    x = torch.randn(1, 3, 133, 197, generator=torch.Generator().manual_seed(3))  # level 0: 33x49
    with torch.no_grad():
        compare_logits(wide_reference(x).logits, fast(x).logits, REL_TOL)
    plan = fast.plan(133, 197)
    # a direct conv also says why it is (not) bf16x3: forced here, or why not on this CPU (no AMX-BF16)
    tuned = [p for p in plan if p["why"].split(";")[0] == f"forced {forced}"]
    assert tuned, plan
    expected = (f"Winograd F({forced}x{forced})",) if forced else ("oneDNN conv", "F.conv2d")
    expected = ("bf16x3 (split bfloat16 on AMX)",) if split else expected
    assert all(p["impl"].startswith(expected) for p in tuned), tuned
    # fpn_convs[0] as Winograd forms the level-0 top-down sum in its input transform
    fused = [p for p in tuned if p["impl"].endswith("top-down add in its input transform")]
    assert [p["layer"] for p in fused] == (["decode_head.fpn_convs.0"] if forced else []), tuned
    # 1x1 convs: bf16x3 GEMMs when forced (and MKL's bf16 GEMM is there), else the forced float32 choice
    ones = [
        p for p in plan if " 1x1 @ " in p["part"] and p["why"].startswith(("forced gemm", "forced split"))
    ]
    x3_1x1 = split and native.library() is not None and gemm_bf16bf16f32() is not None
    expected = "bf16x3 GEMM (split bfloat16 on AMX)" if x3_1x1 else "GEMM" if gemm else "oneDNN"
    assert ones and all(p["impl"] == expected for p in ones), plan


def test_plan_names_layers_and_reasons(wide_reference):
    fast = upernet_fast.load(wide_reference, tune=False)
    plan = fast.plan(96, 128)
    layers = {p["layer"] for p in plan}
    assert {"decode_head.fpn_convs.0", "decode_head.fpn_bottleneck", "decode_head.bottleneck"} <= layers
    assert all(p["impl"] and p["why"] for p in plan)
    exact = upernet_fast.load(wide_reference, winograd=False).plan(96, 128)
    assert not any("Winograd" in p["impl"] for p in exact)
    strict = upernet_fast.load(wide_reference, winograd=False, bf16x3=False).plan(96, 128)
    assert not any("Winograd" in p["impl"] or "bf16x3" in p["impl"] for p in strict)


def test_plan_is_decided_once_per_input_signature_then_replayed(wide_reference, monkeypatch):
    """The first forward with an input signature decides (and records) every choice; later forwards replay
    the frozen plan without deciding again; another size or a switch change gets its own plan."""
    fast = upernet_fast.load(wide_reference, tune=False)
    calls = []
    real = dispatch.winograd_choice

    def spy(*args):
        calls.append(args[1].shape)
        return real(*args)

    monkeypatch.setattr(dispatch, "winograd_choice", spy)
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        first = fast(x).logits
        decided = len(calls)
        assert decided > 0
        again = fast(x).logits
    assert len(calls) == decided and torch.equal(first, again)
    plan = fast.plan(96, 128)
    assert len(calls) == decided and plan and all(p["why"] for p in plan)
    fast.plan(64, 64)  # another size: decided anew
    assert len(calls) > decided
    n = len(calls)
    fast.winograd = False  # a switch is part of the signature
    assert not any("Winograd" in p["impl"] for p in fast.plan(96, 128))
    assert len(calls) > n


def test_timing_noise_does_not_flip_the_default_choice():
    """A candidate replaces the default rule's choice only when it is more than MARGIN faster."""
    assert tuning._pick({0: 10.0, 4: 9.8, 6: 12.0}, default=0) == 0  # 2% faster: noise
    assert tuning._pick({0: 10.0, 4: 9.0, 6: 12.0}, default=0) == 4  # 10% faster: measured win
    assert tuning._pick({0: 10.0, 1: 9.0}, default=1) == 1


def test_candidates_are_timed_in_turns(monkeypatch):
    """One warm-up each, then the candidates take turns, so a burst of load from another process falls on
    one run of one candidate, not on all of its runs: the best run still wins. A candidate far behind after
    a round drops out of the race."""
    clock, order, slow_once = [0.0], [], {"a": 1}
    cost = {"a": 1.0, "b": 2.0, "c": 10.0}  # ms per call

    def fn(name):
        def call():
            order.append(name)
            burst = 50.0 if name == "a" and order.count("a") == 3 and slow_once.pop("a", 0) else 0.0
            clock[0] += (cost[name] + burst) / 1e3

        return call

    monkeypatch.setattr(tuning.time, "perf_counter", lambda: clock[0])
    times = tuning._time_candidates({k: fn(k) for k in "abc"})
    assert order == ["a", "b", "c", "a", "b", "c", "a", "b", "a", "b"]  # c is out after round 1
    assert times == pytest.approx({"a": 1.0, "b": 2.0, "c": 10.0})
    assert tuning._pick(times, default="b") == "a"


def test_both_tuned_choices_keep_the_default_within_the_margin(tuning_cache, monkeypatch):
    monkeypatch.setattr(tuning, "measure_conv1x1", lambda *a: {1: 9.8, 0: 10.0})
    assert tuning.gemm_1x1(256, 512, 64, 64, torch.float32, default=False)[0] is False
    monkeypatch.setattr(tuning, "measure_conv1x1", lambda *a: {1: 9.0, 0: 10.0})
    assert tuning.gemm_1x1(256, 512, 32, 32, torch.float32, default=False)[0] is True
    monkeypatch.setattr(tuning, "measure_conv3x3", lambda *a: {6: 9.9, 4: 10.0, 0: 30.0})
    assert tuning.winograd_tile(256, 256, 64, 64, default=4)[0] == 4


def test_malformed_entries_are_dropped_and_measured_again(tuning_cache, capsys):
    """A hand-edited or damaged cache file: each malformed entry is ignored (with one warning naming the
    file) and measured again; the valid ones are kept. They used to crash every forward (KeyError etc.)."""
    path = tuning.cache_path()
    good = {"choice": 6, "ms": {"0": 3.0, "4": 2.0, "6": 1.5}}
    entries = {
        "conv3x3:64->64@32x32": good,
        "conv3x3:64->64@16x16": {**good, "choice": 5},  # not a candidate
        "conv3x3:64->64@8x8": {**good, "choice": "banana"},
        "conv1x1:64->64@8x8:float32": "GEMM",
        "conv3x3:64->64@4x4": {"choice": 4},  # no times
        "unknown-kind:1": good,
        # a width entry may only hold the widths offered for its map (here 170, 176, 192)
        "conv3x3-bf16x3-width:64->64@128x170": {"choice": 100, "ms": {"170": 2.0, "100": 1.0}},
        "conv3x3-bf16x3-width:64->64@64x170": {"choice": 176, "ms": {"170": 2.0, "176": 1.0, "192": 1.5}},
        "conv3x3-bf16x3-width:64->64@32x0": {"choice": 0, "ms": {"0": 1.0}},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": tuning.machine_key(), "entries": entries}))
    assert tuning._read_table(path) == {
        "conv3x3:64->64@32x32": good,
        "conv3x3-bf16x3-width:64->64@64x170": entries["conv3x3-bf16x3-width:64->64@64x170"],
    }
    assert "ignoring malformed tuning entries" in capsys.readouterr().err
    path.write_text(json.dumps({"machine": tuning.machine_key(), "entries": [1, 2]}))
    assert tuning._read_table(path) == {}
    path.write_text("[1, 2, 3]")
    assert tuning._read_table(path) == {}
