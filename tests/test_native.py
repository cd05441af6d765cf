"""Building and loading the native helpers (kernels/native.py): cache, switch, and the fallback when the
build fails. Their numerics are tested in test_winograd.py."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from upernet_fast.kernels import _common, native
from upernet_fast.kernels.winograd import conv3x3_winograd, winograd_weight


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """A clean `native.library()` cache with its own build directory; restored afterwards."""
    monkeypatch.setenv(native.CACHE_ENV_VAR, str(tmp_path))
    native.library.cache_clear()
    yield tmp_path
    native.library.cache_clear()


def test_builds_here_and_reuses_the_cached_build(fresh_library):
    lib = native.library()
    assert lib is not None, "the C helpers must build on these machines (gcc is part of the image)"
    (built,) = fresh_library.glob("upernet_fast_native-*.so")
    stamp = built.stat().st_mtime_ns
    native.library.cache_clear()
    assert native.library() is not None
    assert built.stat().st_mtime_ns == stamp, "a second process must load the cached build, not rebuild"


def test_switched_off_by_env(fresh_library, monkeypatch):
    monkeypatch.setenv(native.ENV_VAR, "0")
    assert native.library() is None
    assert not list(fresh_library.glob("*.so"))


def test_failed_build_warns_and_winograd_falls_back(fresh_library, monkeypatch):
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    with pytest.warns(RuntimeWarning, match="native CPU helpers unavailable"):
        assert native.library() is None
    assert not [p for p in os.listdir(fresh_library) if p.endswith(".so")], "no partial build left behind"
    g = torch.Generator().manual_seed(0)  # unseeded, 3% of draws miss 1e-5 (F(4x4) rounding, up to 1.7e-5)
    x = torch.randn(1, 8, 9, 10, generator=g)
    w = torch.randn(6, 8, 3, 3, generator=g) / 10
    out = conv3x3_winograd(x, winograd_weight(w))  # the PyTorch transforms
    torch.testing.assert_close(out.double(), F.conv2d(x.double(), w.double(), padding=1), rtol=0, atol=1e-5)


def test_switches_are_read_from_the_environment():
    """UPERNET_FAST_HUGEPAGES=0 leaves buffers unadvised; UPERNET_FAST_NATIVE=0 keeps the C helpers off
    (both as a fresh process sees them)."""
    code = (
        "from upernet_fast.kernels import _memory, native; "
        "print(_memory._madvise is None, native.library() is None)"
    )
    for value in ("0", "off"):  # one parser for every switch (kernels/_common.env_switch)
        env = {**os.environ, "UPERNET_FAST_HUGEPAGES": value, native.ENV_VAR: value}
        run = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        assert run.stdout.split() == ["True", "True"], value + run.stdout + run.stderr


def test_build_is_keyed_by_the_isa_and_cpu(fresh_library, monkeypatch):
    """The binary is built for this CPU's vector ISA, and a cache written on another CPU (other model name
    or ISA) is never loaded here: its key differs, so this machine builds its own."""
    assert native.isa() in native.ISA_FLAGS
    flags = native.cpu_flags()
    if flags:  # the ISA follows the CPU's own flags
        expected = (
            "avx512"
            if {"avx512f", "avx512vl", "avx512bw", "avx512dq"} <= flags
            else "avx2"
            if {"avx2", "fma"} <= flags
            else "baseline"
        )
        assert native.isa() == expected
    assert native.library() is not None
    (built,) = fresh_library.glob("upernet_fast_native-*.so")
    assert built.name.startswith(f"upernet_fast_native-{native.isa()}-")
    for flag in native.ISA_FLAGS[native.isa()]:
        assert flag in native._flag_sets()[0]
    # The same sources seen from another CPU model: another file name, so another build.
    native.library.cache_clear()
    monkeypatch.setattr(native, "cpu_model", lambda: "Some Other CPU @ 1.0GHz")
    assert native.library() is not None
    assert len(list(fresh_library.glob("upernet_fast_native-*.so"))) == 2


@pytest.mark.parametrize("cap", ["avx2", "baseline"])
def test_isa_cap_runs_as_a_lesser_cpu(tmp_path, cap):
    """``UPERNET_FAST_ISA`` hides what a lesser CPU lacks (for ``avx2``: AVX-512, AMX, native bf16, as on
    the AVX2-only AMD EPYC kind): the helpers are built for that level and the AMX/bf16 paths are off."""
    code = (
        "from upernet_fast import dispatch\n"
        "from upernet_fast.kernels import gemm_bf16x3, native\n"
        "hidden = any(f.startswith(('avx512', 'amx')) for f in native.cpu_flags())\n"
        "name = native.library()._name.rsplit('/', 1)[-1]\n"
        "print(native.isa(), name.split('-')[1], hidden, dispatch.native_bf16(), dispatch.amx_bf16(),"
        " gemm_bf16x3.amx_gemm_available())"
    )
    env = {**os.environ, _common.ISA_ENV_VAR: cap, native.CACHE_ENV_VAR: str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr
    real = native.isa()  # this process: no cap
    expected = min(real, cap, key=_common.ISA_LEVELS.index)
    assert run.stdout.split() == [expected, expected, "False", "False", "False", "False"], run.stdout


def test_isa_cap_refuses_an_unknown_level(monkeypatch):
    monkeypatch.setenv(_common.ISA_ENV_VAR, "avx1024")
    with pytest.raises(
        ValueError, match="UPERNET_FAST_ISA='avx1024' is not an ISA level; use one of baseline"
    ):
        _common.isa_cap()
    monkeypatch.setenv(_common.ISA_ENV_VAR, "AVX512")  # the top level, any case: no cap
    assert _common.isa_cap() is None


def test_a_damaged_cached_library_is_rebuilt_not_loaded(monkeypatch, tmp_path):
    """Loading a truncated .so (a partial copy of the cache) kills the process with SIGBUS: each build
    records its SHA-256 beside it, and a file that does not match is rebuilt."""
    import shutil

    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler here")
    monkeypatch.setenv(native.CACHE_ENV_VAR, str(tmp_path))
    flags = native._flag_sets()[0]
    target = native._build(cc, flags)
    good = target.read_bytes()
    target.write_bytes(good[: len(good) // 3])
    assert native._build(cc, flags) == target and len(target.read_bytes()) > len(good) // 3
    assert (tmp_path / (target.name + ".sha256")).read_text() == native._sha256(target)
