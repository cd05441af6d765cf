"""Implementation choices measured on the machine that runs the model, cached per CPU.

Which convolution algorithm is fastest for a layer depends on the CPU: on an AVX2 EPYC, Winograd F(6x6)
beat F(4x4) for 512-channel 3x3 convs from 64x64 maps on; on an AVX-512 Xeon F(4x4) won at 128x128 and
F(4x4) already beat the direct conv for 128 channels at 8x8 (bench/results/). So the first time a conv
shape is seen, each candidate (3x3: oneDNN's direct conv, Winograd F(4x4), F(6x6); 1x1 on channels-last
input: oneDNN or one GEMM into a huge-page buffer; on AMX CPUs, a direct 3x3 or a 1x1 float32 conv and a
ConvNeXt block MLP as float32 or as bf16x3) is timed once on random
data of that shape, capped at `CAP` pixels a side (per-pixel cost is about flat beyond it, so larger
inputs reuse the same entry, and one measurement stays under a second; the width of a bf16x3 conv's passes
is the exception, measured at the real width: `bf16x3_width`), the candidates taking turns so that load
from another process does not fall on one of them alone, and the winner is kept in a JSON file
in the cache directory, keyed by CPU model, ISA, thread count and torch version. A model has 5-20
such shapes (a few seconds once: ~3.5 s for ConvNeXt-T on an AMX Xeon, which has the most candidates;
then nothing); every later process on the same machine reads the file.

`UPERNET_FAST_TUNE=0` (or `load(..., tune=False)`) skips the measurements and uses the default rules in
`upernet_fast.dispatch`, chosen to be right on AVX2 and AVX-512 machines alike.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import sys
import time
from pathlib import Path

import torch

from .kernels import native

CAP = 128  # largest map side measured
MIN_MACS = 20e6  # smaller convs (< ~0.2 ms) are not worth timing: their differences are noise
MARGIN = 0.05  # another candidate replaces the default rule's choice only when at least this much faster
CANDIDATES = (0, 4, 6)  # direct, F(4x4), F(6x6)
# 6: candidates timed in turns (entries timed one after the other could hold another process's load);
# 5: bf16x3 1x1 candidates on our AMX GEMM (faster); 4: oneDNN ones on prepacked weights
_VERSION = 6


def machine_key() -> dict[str, object]:
    """What a measurement is valid for."""
    flags = native.cpu_flags()
    return {
        "cpu": native.cpu_model(),
        "isa": native.isa(),
        "bf16": sorted(f for f in flags if f in ("avx512_bf16", "amx_bf16", "amx_tile")),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "native": native.library() is not None,
        "version": _VERSION,
    }


def cache_path() -> Path:
    key = machine_key()
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return native.cache_dir() / f"tuning-{key['isa']}-{key['threads']}t-{digest}.json"


def _candidates(name: str) -> dict[int, str] | None:
    """The candidates an entry ``name`` may hold, with their names (None: an unknown kind or a malformed
    name): the kind's own, or for a width entry the widths ``bf16x3_widths`` offers for its map width."""
    kind, _, shape = name.partition(":")
    if kind != WIDTH_KIND:
        return NAMES.get(kind)
    match = re.fullmatch(r"\d+->\d+@\d+x(\d+)", shape)
    if not match or int(match.group(1)) < 1:
        return None
    return {width: f"{width} columns" for width in bf16x3_widths(int(match.group(1)))}


def _valid(name: str, entry: object) -> bool:
    """Whether a cached entry has the shape `_measured` writes: a known kind, a choice among its candidates,
    a time per candidate."""
    names = _candidates(name)
    if names is None or not isinstance(entry, dict):
        return False
    choice, ms = entry.get("choice"), entry.get("ms")
    if type(choice) is not int or choice not in names or not isinstance(ms, dict) or not ms:
        return False
    return all(
        isinstance(k, str) and k.lstrip("-").isdigit() and int(k) in names and isinstance(v, (int, float))
        for k, v in ms.items()
    )


@functools.cache
def _table(path: Path) -> dict[str, dict]:
    """This process's table for `path` (read once, then added to by `_measured`)."""
    return _read_table(path)


def _read_table(path: Path) -> dict[str, dict]:
    """The valid entries of the cache file for this machine; a malformed one is dropped with a warning (it is
    measured again), the rest kept."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # no file yet, or unreadable: measure again
    if not isinstance(data, dict) or data.get("machine") != machine_key():
        return {}
    entries = data.get("entries")
    entries = entries if isinstance(entries, dict) else {}
    table = {name: entry for name, entry in entries.items() if _valid(name, entry)}
    if len(table) != len(data.get("entries") or {}) or not isinstance(data.get("entries"), dict):
        print(f"upernet_fast: ignoring malformed tuning entries in {path} (measured again)", file=sys.stderr)
    return table


def _save(path: Path, table: dict[str, dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    native.write_atomically(
        path, json.dumps({"machine": machine_key(), "entries": table}, indent=1, sort_keys=True)
    )


ROUNDS = 3  # timed runs per candidate (2 when a run is long: > 50 ms)
OUT_OF_RACE = 3.0  # a candidate this many times slower than the best after a round is not timed again


def _time_candidates(fns: dict[int, object]) -> dict[int, float]:
    """ms of each candidate ``fn()``: the best of its runs, the candidates taking turns after one warm-up
    call each (first touch of buffers, oneDNN primitive creation). Taking turns matters: timed one after
    the other, a burst of load from another process lands on one candidate only, and its choice is cached
    for good (seen: entries claiming bf16x3 3-8x slower than float32 where it is 2-3x faster). A candidate
    far behind after a round (``OUT_OF_RACE``) is not timed again, which keeps the calibration short."""
    warm: dict[int, float] = {}
    for key, fn in fns.items():
        start = time.perf_counter()
        fn()
        warm[key] = (time.perf_counter() - start) * 1e3
    best: dict[int, float] = {key: float("inf") for key in fns}
    racing = list(fns)
    for _ in range(2 if max(warm.values()) > 50 else ROUNDS):
        for key in racing:
            start = time.perf_counter()
            fns[key]()
            best[key] = min(best[key], (time.perf_counter() - start) * 1e3)
        fastest = min(best.values())
        racing = [key for key in racing if best[key] <= OUT_OF_RACE * fastest]
    return best


def _conv3x3_inputs(c_in: int, c_out: int, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded random (channels-last x, weight, bias) of a batch-1 3x3 conv to time."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, c_in, h, w, generator=g).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c_out, c_in, 3, 3, generator=g) / (9 * c_in) ** 0.5
    return x, weight, torch.randn(c_out, generator=g)


def measure_conv3x3(c_in: int, c_out: int, h: int, w: int) -> dict[int, float]:
    """ms of one conv3x3 + bias + ReLU (batch 1, channels-last float32, h x w) per candidate tile."""
    from .kernels.conv_bn_relu import conv_bn_relu_torch
    from .kernels.winograd import winograd_weight

    x, weight, bias = _conv3x3_inputs(c_in, c_out, h, w)
    # Winograd first: the direct conv is the slowest where it matters, and is then cut short.
    with torch.no_grad():
        fns = {}
        for tile in sorted(CANDIDATES, reverse=True):
            u = winograd_weight(weight, tile) if tile else None
            fns[tile] = lambda u=u: conv_bn_relu_torch(x, weight, bias, 1, True, u)
        return _time_candidates(fns)


def _pick(times: dict[int, float], default: int) -> int:
    """The fastest candidate, unless the default rule's is within ``MARGIN`` of it (timing noise must not
    flip a choice from run to run)."""
    best = min(times, key=times.get)
    return default if default in times and times[default] <= (1 + MARGIN) * times[best] else best


def winograd_tile(c_in: int, c_out: int, h: int, w: int, default: int = 0) -> tuple[int, str]:
    """(tile, why): the measured-fastest algorithm for a 3x3 float32 conv of this shape on this machine
    (0 = direct), measuring it now if this machine never has; tile -1 for convs too small to time (the
    caller then applies its default rule). ``default``: the default rule's tile, kept when within
    ``MARGIN`` of the fastest."""
    ch, cw = min(h, CAP), min(w, CAP)
    if 9 * c_in * c_out * ch * cw < MIN_MACS:
        return -1, "too small to time reliably"
    entry = _measured(
        f"conv3x3:{c_in}->{c_out}@{ch}x{cw}", lambda: measure_conv3x3(c_in, c_out, ch, cw), default
    )
    return int(entry["choice"]), f"measured on this CPU: {describe(entry, TILE_NAMES)}"


def measure_conv1x1(c_in: int, c_out: int, h: int, w: int, dtype: torch.dtype) -> dict[int, float]:
    """ms of one 1x1 conv + bias (batch 1, channels-last, h x w) on oneDNN (0) and as one GEMM (1)."""
    from .kernels.conv_bn_relu import conv_bn_relu_torch

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, c_in, h, w, generator=g).to(dtype).contiguous(memory_format=torch.channels_last)
    weight = (torch.randn(c_out, c_in, 1, 1, generator=g) / c_in**0.5).to(dtype)
    with torch.no_grad():
        return _time_candidates(
            {
                int(gemm): (lambda gemm=gemm: conv_bn_relu_torch(x, weight, None, 0, False, None, gemm))
                for gemm in (True, False)
            }
        )


def gemm_1x1(
    c_in: int, c_out: int, h: int, w: int, dtype: torch.dtype, default: bool = False
) -> tuple[bool | None, str]:
    """(as GEMM?, why) for a 1x1 conv of this shape on this machine, measured once (None: too small to
    time, the caller's default rule applies)."""
    ch, cw = min(h, CAP), min(w, CAP)
    if c_in * c_out * ch * cw < MIN_MACS:
        return None, "too small to time reliably"
    name = f"conv1x1:{c_in}->{c_out}@{ch}x{cw}:{str(dtype).removeprefix('torch.')}"
    entry = _measured(name, lambda: measure_conv1x1(c_in, c_out, ch, cw, dtype), int(default))
    return bool(entry["choice"]), f"measured on this CPU: {describe(entry, GEMM_NAMES)}"


def measure_bf16x3(c_in: int, c_out: int, h: int, w: int) -> dict[int, float]:
    """ms of one direct conv3x3 + bias + ReLU (batch 1, channels-last float32, h x w) in float32 (0) and as
    bf16x3 (1)."""
    from .kernels.bf16x3 import bf16x3_weight, conv_bf16x3
    from .kernels.conv_bn_relu import conv_bn_relu_torch

    x, weight, bias = _conv3x3_inputs(c_in, c_out, h, w)
    split = bf16x3_weight(weight)
    with torch.no_grad():
        conv_bf16x3(x, split, bias, 1, True)  # its two oneDNN primitives and buffers: the first call is ~1.5x
        return _time_candidates(
            {
                1: lambda: conv_bf16x3(x, split, bias, 1, True),
                0: lambda: conv_bn_relu_torch(x, weight, bias, 1, True),
            }
        )


def bf16x3_widths(w: int) -> list[int]:
    """The widths a bf16x3 3x3 conv of a ``w``-column map may run at: its own, and the next multiples of
    16 and 32 (oneDNN's AMX conv kernels block the output columns: at 128x170 its bf16 conv over 1536
    channels took 216 ms, at 128x176 147 ms, on a Xeon with AMX-BF16)."""
    return sorted({w, -(-w // 16) * 16, -(-w // 32) * 32})


def measure_bf16x3_width(c_in: int, c_out: int, h: int, w: int) -> dict[int, float]:
    """ms of one bf16x3 conv3x3 + bias + ReLU (batch 1, channels-last float32, h x w) with its bfloat16
    passes run at each of ``bf16x3_widths(w)``."""
    from .kernels.bf16x3 import bf16x3_weight, conv_bf16x3

    x, weight, bias = _conv3x3_inputs(c_in, c_out, h, w)
    split = bf16x3_weight(weight)
    with torch.no_grad():
        return _time_candidates(
            {
                width: lambda width=width: conv_bf16x3(x, split, bias, 1, True, width)
                for width in bf16x3_widths(w)
            }
        )


def bf16x3_width(c_in: int, c_out: int, h: int, w: int) -> tuple[int, str]:
    """(width, why): the fastest of ``bf16x3_widths(w)`` for a bf16x3 3x3 conv of this shape on this
    machine, measured once. Rows are capped at ``CAP``, the width is not (the kernel choice depends on it);
    too small to time: ``w`` itself."""
    ch = min(h, CAP)
    if 9 * c_in * c_out * ch * w < MIN_MACS:
        return w, "too small to time reliably"
    name = f"{WIDTH_KIND}:{c_in}->{c_out}@{ch}x{w}"
    entry = _measured(name, lambda: measure_bf16x3_width(c_in, c_out, ch, w), w)
    return int(entry["choice"]), f"measured on this CPU: {describe(entry, _candidates(name))}"


def measure_bf16x3_1x1(c_in: int, c_out: int, h: int, w: int) -> dict[int, float]:
    """ms of one 1x1 conv + bias (batch 1, channels-last float32, h x w) in float32 (0: the faster of oneDNN
    and one GEMM, as ``gemm_1x1`` would pick) and as a bf16x3 GEMM (1)."""
    from .kernels.conv_bn_relu import conv_bn_relu_torch
    from .kernels.gemm_bf16x3 import conv1x1_bf16x3, pack_weight

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, c_in, h, w, generator=g).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.randn(c_out, c_in, 1, 1, generator=g) / c_in**0.5, torch.randn(c_out, generator=g)
    packed = pack_weight(weight.view(c_out, c_in))
    with torch.no_grad():
        times = _time_candidates(
            {
                1: lambda: conv1x1_bf16x3(x, packed, bias, False),
                0: lambda: conv_bn_relu_torch(x, weight, bias, 0, False, None, False),
                2: lambda: conv_bn_relu_torch(x, weight, bias, 0, False, None, True),
            }
        )
    return {1: times[1], 0: min(times[0], times[2])}


def bf16x3(
    c_in: int, c_out: int, h: int, w: int, default: bool = False, kernel: int = 3
) -> tuple[bool | None, str]:
    """(as bf16x3?, why) for a direct 3x3 (``kernel`` 3) or a 1x1 float32 conv of this shape on this
    machine, measured once (None: too small to time, the caller's default rule applies)."""
    ch, cw = min(h, CAP), min(w, CAP)
    if kernel * kernel * c_in * c_out * ch * cw < MIN_MACS:
        return None, "too small to time reliably"
    kind, measure = ("conv3x3", measure_bf16x3) if kernel == 3 else ("conv1x1", measure_bf16x3_1x1)
    name = f"{kind}-bf16x3:{c_in}->{c_out}@{ch}x{cw}"
    entry = _measured(name, lambda: measure(c_in, c_out, ch, cw), int(default))
    return bool(entry["choice"]), f"measured on this CPU: {describe(entry, BF16X3_NAMES)}"


def measure_mlp_bf16x3(c: int, hidden: int, h: int, w: int) -> dict[int, float]:
    """ms of one ConvNeXt block MLP (LayerNorm, C -> hidden -> C, GELU, residual; batch 1, channels-last
    float32, h x w) as oneDNN float32 1x1 convs (0) and as bf16x3 (1)."""
    from .backbones.convnext import mlp_onednn
    from .backbones.fused_linear import FUSED_ACT
    from .kernels._common import onednn_prepacked
    from .kernels.gemm_bf16x3 import mlp_bf16x3_, pack_weight

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, c, h, w, generator=g).contiguous(memory_format=torch.channels_last)
    w1, w2 = torch.randn(hidden, c, generator=g) / c**0.5, torch.randn(c, hidden, generator=g) / hidden**0.5
    b1, b2 = torch.randn(hidden, generator=g), torch.randn(c, generator=g)
    p1, p2, y = pack_weight(w1), pack_weight(w2), torch.empty_like(x)
    # prepacked as the model's own (ConvNextLayer.prepacked_onednn)
    o1 = onednn_prepacked(w1[:, :, None, None], x.shape)
    o2 = onednn_prepacked(w2[:, :, None, None], (1, hidden, h, w))

    def onednn() -> torch.Tensor:  # on x itself as the dwconv output: the MLP alone is timed
        return mlp_onednn(x, x, o1, b1, o2, b2, 1e-6, FUSED_ACT["gelu"])

    def bf16x3() -> torch.Tensor:
        y.copy_(x)  # stands in for the dwconv output it overwrites (a copy: ~2% of the MLP's time)
        return mlp_bf16x3_(y, x, p1, b1, p2, b2, 1e-6)

    with torch.no_grad():
        return _time_candidates({1: bf16x3, 0: onednn})


def mlp_bf16x3(c: int, hidden: int, h: int, w: int, default: bool = False) -> tuple[bool | None, str]:
    """(as bf16x3?, why) for a ConvNeXt block MLP of this shape on this machine, measured once (None: too
    small to time, the caller's default rule applies)."""
    ch, cw = min(h, CAP), min(w, CAP)
    if 2 * c * hidden * ch * cw < MIN_MACS:
        return None, "too small to time reliably"
    name = f"convnext-mlp-bf16x3:{c}->{hidden}@{ch}x{cw}"
    entry = _measured(name, lambda: measure_mlp_bf16x3(c, hidden, ch, cw), int(default))
    return bool(entry["choice"]), f"measured on this CPU: {describe(entry, BF16X3_NAMES)}"


def _measured(name: str, measure, default: int) -> dict:
    """The cached entry ``{"choice", "ms"}`` for ``name``, measuring (and saving) it on a miss."""
    path = cache_path()
    table = _table(path)
    entry = table.get(name)
    if entry is None:
        start = time.perf_counter()
        times = measure()
        entry = table[name] = {
            "choice": _pick(times, default),
            "ms": {str(k): round(v, 3) for k, v in times.items()},
        }
        try:  # onto the file as it is now: another process may have added entries meanwhile
            _save(path, {**_read_table(path), **table})
        except OSError as e:  # a read-only cache only costs a re-measurement next time
            print(f"upernet_fast: could not save tuning results to {path} ({e})", file=sys.stderr)
        names = _candidates(name)
        print(
            f"upernet_fast: tuned {name} for this CPU in {time.perf_counter() - start:.1f} s (once; cached): "
            f"{describe(entry, names)}",
            file=sys.stderr,
        )
    return entry


TILE_NAMES = {0: "direct", 4: "F(4x4)", 6: "F(6x6)"}


GEMM_NAMES = {0: "oneDNN", 1: "GEMM"}


BF16X3_NAMES = {0: "float32", 1: "bf16x3"}


WIDTH_KIND = "conv3x3-bf16x3-width"  # its candidates depend on the entry's width: `_candidates`


NAMES = {
    "conv3x3": TILE_NAMES,
    "conv1x1": GEMM_NAMES,
    "conv3x3-bf16x3": BF16X3_NAMES,
    "conv1x1-bf16x3": BF16X3_NAMES,
    "convnext-mlp-bf16x3": BF16X3_NAMES,
}


def describe(entry: dict, names: dict[int, str]) -> str:
    ms = ", ".join(f"{names[int(k)]} {v:.3g} ms" for k, v in entry["ms"].items())
    return f"{ms} -> {names[int(entry['choice'])]}"
