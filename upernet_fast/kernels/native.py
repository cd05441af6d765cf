"""Native CPU helpers (``csrc/*.c``): compiled on first use with the system C compiler, loaded with ctypes.

- ``csrc/winograd.c``: the Winograd tile transforms. Gathering input tiles with their zero padding,
  transforming them and scattering the output tiles with bias and ReLU are one pass over memory each in C,
  against five PyTorch passes (pad copy, tile copy, transform GEMM, transform GEMM, strided scatter). The
  GEMMs between the transforms stay on MKL. Also the filters' own transform (``winograd_weight``), made
  once per model in float64.
- ``csrc/resize.c``: the separable bilinear resize of the logits (2.5x faster than ATen's per-pixel loop),
  and the bfloat16 top-down add (resize + add in one pass, one rounding).
- ``csrc/bf16x3.c``: the split and combine passes of the split-bfloat16 float32 conv (``bf16x3.py``).
- ``csrc/usa.c``: ``upsample_shift_add`` of channels-last taps, and a bottleneck's direct conv + all its
  groups + ReLU in one pass (``fpn.py``).
- ``csrc/gemm_bf16x3.c``: the ConvNeXt block MLP and 1x1 convs as split-bfloat16 GEMMs, on MKL or on
  its own AMX kernel (``gemm_bf16x3.py``).

Build: ``cc -O3 -shared -fPIC -fopenmp`` plus the vector ISA of the machine that runs it (``isa()``:
AVX-512 → ``-mavx512f -mavx512vl -mavx512bw -mavx512dq -mfma -mprefer-vector-width=512``, AVX2 →
``-mavx2 -mfma``, else baseline x86-64/aarch64), into ``$UPERNET_FAST_CACHE`` (default
``~/.cache/upernet_fast``). The file name carries the ISA and a hash of the sources, compiler, flags and the
CPU's model name, so a cache shared between machines never hands one CPU a binary built for another, and
later processes on the same machine load it at once. No compiler, a failed build or ``UPERNET_FAST_NATIVE=0``: the
callers keep their PyTorch paths (a warning says why, once). The C loops are OpenMP-parallel over tiles with
``torch.get_num_threads()`` threads; loaded after PyTorch, the library binds to PyTorch's own ``libgomp``
(same soname), so both share one thread pool. (Python threads calling the C code measured 2-4x slower per
transform: PyTorch's OpenMP workers, still spinning after each GEMM, took their cores.)
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

from ._common import ISA_LEVELS, env_switch, isa_cap

ENV_VAR = "UPERNET_FAST_NATIVE"
CACHE_ENV_VAR = "UPERNET_FAST_CACHE"
SOURCES = tuple(
    Path(__file__).parent / "csrc" / f
    for f in ("winograd.c", "resize.c", "bf16x3.c", "usa.c", "gemm_bf16x3.c")
)
HEADERS = (Path(__file__).parent / "csrc" / "bf16.h",)  # part of the build key, not of the command line

_L, _I, _P = ctypes.c_long, ctypes.c_int, ctypes.c_void_p
_SIGNATURES: dict[str, tuple] = {
    f"wino_f{m}3_{part}": args
    for m in (4, 6)
    for part, args in (
        # x, sb, sh, sw, H, W, C, row0, rows, tw, n, threads, V, ldv, lo, lb, lh, lw, ij[4], lam[4]
        ("input", (_P, _L, _L, _L, _I, _I, _I, _I, _I, _I, _L, _I, _P, _L, _P, _L, _L, _L, _P, _P)),
        # M, n, Co, row0, rows, tw, threads, bias, relu, y, ob, oh, ow, H, W
        ("output", (_P, _L, _I, _I, _I, _I, _I, _P, _I, _P, _L, _L, _L, _I, _I)),
    )
}
# w, Cout, Cin, kron, P2, u, threads
_SIGNATURES["wino_weight"] = (_P, _L, _L, _P, _I, _P, _I)
# x, B, C, sb, sc, sh, sw, h, w, y, H, W, i0, i1, l0h, l1h, j0, j1, l0w, l1w, threads -> nonzero on failure
_SIGNATURES["resize_bilinear_planes"] = (_P, _L, _L, _L, _L, _L, _L, _I, _I, _P, _I, _I, *[_P] * 8, _I)
# x, hi, x3, rows, W, Wp, C, threads / y_hi, r, bias, y, rows, W, Wp, C, relu, threads
_SIGNATURES["bf16x3_split"] = (_P, _P, _P, _L, _I, _I, _I, _I)
_SIGNATURES["bf16x3_combine"] = (_P, _P, _P, _P, _L, _I, _I, _I, _I, _I)
# y, x, rows, C, N, eps, w1, b1, w2, b2, chunk, a1, h, a2, tmp, gemm, threads / x, y, n
_SIGNATURES["bf16x3_convnext_mlp"] = (_P, _P, _L, _I, _I, ctypes.c_float, *[_P] * 4, _L, *[_P] * 5, _I)
# a, rows, K, N, w, bias, relu, out, chunk, abuf, gemm, threads
_SIGNATURES["bf16x3_linear"] = (_P, _L, _I, _I, _P, _P, _I, _P, _L, _P, _P, _I)
_SIGNATURES["gelu_erf_reference"] = (_P, _P, _L)
# -> 1 when this process may use AMX tiles (never on CPUs without AMX, or builds without the kernel)
_SIGNATURES["amx_request"] = ()
# out, ob, oh, ow, B, H, W, C, base, base_kind, bb, bh, bw, G, groups, relu, workspace, threads
_SIGNATURES["usa_sum_nhwc"] = (_P, _L, _L, _L, _I, _I, _I, _I, _P, _I, _L, _L, _L, _I, _P, _I, _P, _I)
_SIGNATURES["usa_sum_workspace"] = (_I, _I)  # G, C -> floats per thread
# hi, hb, hh, hw, lo, lb, lh, lw, y, yb, yh, yw, B, C, H, W, i0, i1, l0h, l1h, j0, j1, l0w, l1w, threads
_SIGNATURES["topdown_add_nhwc_bf16"] = (*[_P, _L, _L, _L] * 3, _L, _I, _I, _I, *[_P] * 8, _I)
_RETURNS = {"resize_bilinear_planes": ctypes.c_int, "amx_request": ctypes.c_int, "usa_sum_workspace": _L}


def enabled() -> bool:
    """False when the switch ``UPERNET_FAST_NATIVE`` is off."""
    return env_switch(ENV_VAR)


ISA_FLAGS = {
    "avx512": [
        "-mavx2",
        "-mfma",
        "-mavx512f",
        "-mavx512vl",
        "-mavx512bw",
        "-mavx512dq",
        "-mprefer-vector-width=512",
    ],
    "avx2": ["-mavx2", "-mfma"],
    "baseline": [],
}


# Flags hidden by each ``UPERNET_FAST_ISA`` cap (prefixes): what a CPU of that level lacks.
_ABOVE_CAP = {"avx2": ("avx512", "amx", "avx_vnni"), "baseline": ("avx512", "amx", "avx_vnni", "avx2", "fma")}


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags the kernel reports (``/proc/cpuinfo``; empty where there is none), without
    those above the ``UPERNET_FAST_ISA`` cap (``_common.isa_cap``)."""
    flags: frozenset[str] = frozenset()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = frozenset(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    cap = isa_cap()
    if cap is not None:
        flags = frozenset(f for f in flags if not f.startswith(_ABOVE_CAP[cap]))
    return flags


@functools.cache
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


@functools.cache
def isa() -> str:
    """The vector ISA the helpers are built for here: ``avx512`` (F+VL+BW+DQ), ``avx2`` (with FMA) or
    ``baseline``. Read from the CPU itself, falling back to PyTorch's own capability check."""
    flags = cpu_flags()
    if not flags:
        level = {"AVX512": "avx512", "AVX2": "avx2"}.get(torch.backends.cpu.get_cpu_capability(), "baseline")
        cap = isa_cap()
        return level if cap is None else min(level, cap, key=ISA_LEVELS.index)
    if {"avx512f", "avx512vl", "avx512bw", "avx512dq"} <= flags:
        return "avx512"
    if {"avx2", "fma"} <= flags:
        return "avx2"
    return "baseline"


def _flag_sets() -> list[list[str]]:
    """Compiler flags to try in order: with OpenMP, then without (the transforms then run on one thread)."""
    flags = ["-O3", "-shared", "-fPIC", "-std=gnu99", *ISA_FLAGS[isa()]]
    return [[*flags, "-fopenmp"], flags]


def cache_dir() -> Path:
    """``$UPERNET_FAST_CACHE``, else ``$XDG_CACHE_HOME/upernet_fast`` or ``~/.cache/upernet_fast``."""
    base = os.environ.get(CACHE_ENV_VAR) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "upernet_fast"
    )
    return Path(base)


def _build(cc: str, flags: list[str]) -> Path:
    src = b"".join(path.read_bytes() for path in (*SOURCES, *HEADERS))
    machine = f"{cpu_model()}|{sys.platform}|{os.uname().machine if hasattr(os, 'uname') else ''}"
    key = hashlib.sha256(src + cc.encode() + " ".join(flags).encode() + machine.encode()).hexdigest()[:16]
    target = cache_dir() / f"upernet_fast_native-{isa()}-{key}.so"
    digest = target.with_name(target.name + ".sha256")
    if target.exists() and digest.exists() and digest.read_text().strip() == _sha256(target):
        return target  # checked: a truncated copy of the cache would kill the process (SIGBUS) on load
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent first uses never load a half-written file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        run = subprocess.run(
            [cc, *flags, *map(str, SOURCES), "-o", tmp],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if run.returncode != 0:
            raise RuntimeError(f"`{cc}` failed ({run.returncode}): {run.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
        write_atomically(digest, _sha256(target))
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_atomically(path: Path, text: str) -> None:
    """`text` into `path` through a temporary file in the same folder and a rename: concurrent processes
    never read a half-written file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled helpers, or None (switched off, not Linux/macOS, or, warned once: no compiler or a
    failed build)."""
    if not enabled() or not sys.platform.startswith(("linux", "darwin")):
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    try:
        if cc is None:
            raise RuntimeError("no C compiler found (set CC, or install gcc)")
        if cache_dir().exists() and not cache_dir().is_dir():
            raise RuntimeError(f"the cache folder {cache_dir()} is a file; set {CACHE_ENV_VAR} to a folder")
        errors = []
        for flags in _flag_sets():
            try:
                path = _build(cc, flags)
                break
            except (RuntimeError, subprocess.SubprocessError) as e:
                errors.append(str(e))
        else:
            raise RuntimeError("; ".join(errors))
        lib = ctypes.CDLL(str(path))
        for name, argtypes in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, _RETURNS.get(name)
    # AttributeError: a library without one of the symbols (a foreign file under our name)
    except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as e:
        warnings.warn(
            f"upernet_fast: native CPU helpers unavailable ({e}); using the PyTorch paths instead "
            f"(same results up to rounding, slower). Set {ENV_VAR}=0 to silence this.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    return lib
