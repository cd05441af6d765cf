"""Microbenchmarks: each fused op (kernels/, through upernet_fast.dispatch) against the unfused PyTorch
sequence it replaces, at the real shapes of ConvNeXt-T UPerNet at 512x512 (decode head width 512, ADE20K's
150 classes), batch 1, float32.

CPU: the PyTorch paths, timed with time.perf_counter, unfused and fused taking turns (interleaved) after a
warm-up, median of --repeats. CUDA: triton.testing.do_bench (Triton paths). Prints a table and, with
--json, writes every figure with the backend it was measured with, the machine and the versions.

    python bench/bench_ops.py                 # full shapes (several minutes on 2 cores)
    python bench/bench_ops.py --quick         # small shapes, seconds (CI smoke)
    python bench/bench_ops.py --only upsample_shift_add --json out.json
    python bench/bench_ops.py --threads 1     # ratios stay meaningful when another process holds a core

Many short parallel regions (the fused CPU paths work in cache-sized blocks) suffer badly from OpenMP
oversubscription: with 2 threads on 2 cores and another busy process, timings are meaningless.

A benchmark reports ratios; nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e import machine_info, non_negative_int, positive_int  # noqa: E402

from upernet_fast import dispatch  # noqa: E402
from upernet_fast.folding import fold_batchnorm_tensors
from upernet_fast.kernels import conv3x3_taps_weight
from upernet_fast.kernels.winograd import winograd_weight


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def _label_mismatch(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a != b).sum().item())


@dataclass
class Case:
    op: str  # dispatch op name (the fused side)
    shape: str
    unfused: Callable[[], Any]
    fused: Callable[[], Any]
    compare: Callable[[Any, Any], float] = _max_abs
    note: str = ""


def _cl(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last)


def _rand(*shape: int, device: str, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device)


def build_cases(quick: bool, device: str, backend: str) -> list[Case]:
    """The benchmark matrix. ``quick`` shrinks channels and sizes so the whole run takes seconds."""
    C = 64 if quick else 512  # decode head width
    S = 32 if quick else 128  # level-0 feature size at a 512x512 input (stride 4)
    levels = [S, S // 2, S // 4, S // 8]
    ops = dispatch.ops_for(backend, device)
    cases: list[Case] = []

    # conv module: Conv2d(bias=False) -> BatchNorm2d (eval) -> ReLU, vs the folded conv with fused epilogue.
    for k, size in [(3, levels[0]), (3, levels[1]), (3, levels[2]), (1, levels[3])]:
        x = _rand(1, C, size, size, device=device)
        w = _rand(C, C, k, k, device=device, seed=1, scale=(C * k * k) ** -0.5)
        gamma, beta = _rand(C, device=device, seed=2).abs() + 0.5, _rand(C, device=device, seed=3)
        mean, var = _rand(C, device=device, seed=4), _rand(C, device=device, seed=5).abs() + 0.5
        wf, bf = fold_batchnorm_tensors(w, None, gamma, beta, mean, var, 1e-5)
        pad = k // 2

        def unfused(x=x, w=w, gamma=gamma, beta=beta, mean=mean, var=var, pad=pad):
            return F.relu(F.batch_norm(F.conv2d(x, w, padding=pad), mean, var, gamma, beta, False, 0.0, 1e-5))

        cases.append(
            Case("conv_bn_relu", f"{C}->{C} k{k} {size}x{size}", unfused,
                 lambda x=x, wf=wf, bf=bf, pad=pad: ops.conv_bn_relu(x, wf, bf, pad, True))
        )  # fmt: skip
        xc = _cl(x)
        tile = dispatch.winograd_tile(ops, xc, wf, pad)
        if tile:  # what the head runs for this conv (CPU, wide, 3x3)
            u = winograd_weight(wf, tile)
            cases.append(
                Case("conv_bn_relu", f"{C}->{C} k{k} {size}x{size} winograd", unfused,
                     lambda xc=xc, wf=wf, bf=bf, u=u: ops.conv_bn_relu(xc, wf, bf, 1, True, u),
                     note=f"Winograd F({tile}x{tile},3x3), channels-last input; error column vs the exact conv")
            )  # fmt: skip

    # PPM pooling: 768 channels at 16x16 (ConvNeXt-T stage 4), scales 1, 2, 3, 6.
    cp = 96 if quick else 768
    x = _rand(1, cp, levels[3], levels[3], device=device)
    scales = [1, 2, 3, 6]
    cases.append(
        Case("adaptive_pool_multi", f"{cp}ch {levels[3]}x{levels[3]} s=1,2,3,6",
             lambda x=x: [F.adaptive_avg_pool2d(x, s) for s in scales],
             lambda x=x: ops.adaptive_pool_multi(x, scales),
             lambda a, b: max(_max_abs(p, q) for p, q in zip(a, b)))
    )  # fmt: skip

    # Top-down add: laterals[i-1] += up(laterals[i]).
    for hi_s, lo_s in zip(levels[:-1], levels[1:]):
        hi, lo = _rand(1, C, hi_s, hi_s, device=device), _rand(1, C, lo_s, lo_s, device=device, seed=1)
        cases.append(
            Case("topdown_add", f"{C}ch {lo_s}->{hi_s}",
                 lambda hi=hi, lo=lo: hi + F.interpolate(lo, size=hi.shape[2:], mode="bilinear", align_corners=False),
                 lambda hi=hi, lo=lo: ops.topdown_add(hi, lo))
        )  # fmt: skip

    # fpn_bottleneck part of one pyramid level: conv3x3(upsample(x)) vs 1x1 taps at low-res + upsample_shift_add.
    size = (levels[0], levels[0])
    for s in levels[1:]:
        x = _rand(1, C, s, s, device=device)
        w = _rand(C, C, 3, 3, device=device, seed=1, scale=(9 * C) ** -0.5)
        wt = conv3x3_taps_weight(w)

        def unfused(x=x, w=w):
            return F.conv2d(F.interpolate(x, size=size, mode="bilinear", align_corners=False), w, padding=1)

        for layout in ("nchw", "channels_last"):
            xl = _cl(x) if layout == "channels_last" else x
            cases.append(
                Case("upsample_shift_add", f"{C}->{C} {s}->{size[0]} {layout}", unfused,
                     lambda xl=xl, wt=wt: ops.upsample_shift_add(F.conv2d(xl, wt), size),
                     note="fused = 1x1 conv to 9 taps + upsample_shift_add")
            )  # fmt: skip
        # The op alone, accumulating into an existing buffer as the head does, against its own plain
        # composition: 9 full-size resizes, shifted and added.
        taps = _cl(F.conv2d(_cl(x), wt))
        acc_u = torch.zeros(1, C, *size, device=device)
        acc_f = _cl(torch.zeros(1, C, *size, device=device))
        cases.append(
            Case("upsample_shift_add", f"op only {C}ch {s}->{size[0]} channels_last",
                 lambda taps=taps, acc_u=acc_u: _naive_shift_add(taps, size, acc_u),
                 lambda taps=taps, acc_f=acc_f: ops.upsample_shift_add(taps, size, out=acc_f),
                 note="unfused = 9x (interpolate + shifted add); both accumulate into a preallocated out")
        )  # fmt: skip

    # A split bottleneck's tail (fpn_bottleneck at a 512x512 input): the direct conv's output plus the three
    # upsampled groups' shift-adds, ReLU; float32 result. Unfused: the base widened, one accumulating
    # shift-add per group (the op above), ReLU: the head's sequence before the one-pass sum.
    dtypes = [torch.float32] + ([torch.bfloat16] if device == "cpu" else [])
    for dt in dtypes:
        base = _cl(_rand(1, C, *size, device=device)).to(dt)
        group_taps = [
            _cl(F.conv2d(_cl(_rand(1, C, s, s, device=device, seed=s)), wt)).to(dt) for s in levels[1:]
        ]

        def sequence(base=base, group_taps=group_taps):
            out = base.to(torch.float32, copy=True)  # float32 base: .float() would be base itself
            for t in group_taps:
                ops.upsample_shift_add(t, size, out=out)
            return out.relu_()

        cases.append(
            Case("upsample_shift_add_sum", f"{C}ch {'+'.join(map(str, levels[1:]))}->{size[0]} {dt}".replace("torch.", ""),
                 sequence,
                 lambda base=base, group_taps=group_taps: ops.upsample_shift_add_sum(base, group_taps, True),
                 note="unfused = widen + one accumulating shift-add per group + ReLU")
        )  # fmt: skip

    # Final resize of the logits to the input size, and resize + argmax (label map).
    K, S_out = (21, 4 * S) if quick else (150, 4 * S)
    logits = _rand(1, K, S, S, device=device)
    cases.append(
        Case("resize_bilinear", f"{K}ch {S}->{S_out}",
             lambda: F.interpolate(logits, size=(S_out, S_out), mode="bilinear", align_corners=False),
             lambda: ops.resize_bilinear(logits, (S_out, S_out)))
    )  # fmt: skip
    cases.append(
        Case("resize_argmax", f"{K}ch {S}->{S_out}",
             lambda: F.interpolate(logits, size=(S_out, S_out), mode="bilinear", align_corners=False).argmax(1),
             lambda: ops.resize_argmax(logits, (S_out, S_out)),
             _label_mismatch, note="error column = differing labels")
    )  # fmt: skip
    return cases


def _naive_shift_add(taps: torch.Tensor, size: tuple[int, int], out: torch.Tensor) -> torch.Tensor:
    C, (H, W) = taps.shape[1] // 9, size
    for t in range(9):
        dy, dx = t // 3 - 1, t % 3 - 1
        u = F.interpolate(taps[:, t * C : (t + 1) * C], size=size, mode="bilinear", align_corners=False)
        out[:, :, max(0, -dy) : H - max(0, dy), max(0, -dx) : W - max(0, dx)] += u[
            :, :, max(0, dy) : H + min(0, dy), max(0, dx) : W + min(0, dx)
        ]
    return out


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_pair(case: Case, device: str, repeats: int, warmup: int) -> tuple[float, float, float]:
    """(unfused ms, fused ms, error): interleaved on CPU, do_bench on CUDA."""
    with torch.no_grad():
        err = case.compare(case.unfused(), case.fused())
        if device == "cuda":
            import triton.testing

            return triton.testing.do_bench(case.unfused), triton.testing.do_bench(case.fused), err
        times: dict[str, list[float]] = {"unfused": [], "fused": []}
        for i in range(warmup + repeats):
            for name in ("unfused", "fused"):
                fn = case.unfused if name == "unfused" else case.fused
                _sync(device)
                t0 = time.perf_counter()
                fn()
                _sync(device)
                if i >= warmup:
                    times[name].append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times["unfused"]), statistics.median(times["fused"]), err


def environment(device: str) -> dict[str, Any]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {  # e2e's machine record (CPU model, kind, ISA flags, thread count, versions) and the device
        "machine": {
            **machine_info(),
            "platform": platform.platform(),
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "triton": triton_version,
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="small shapes (seconds)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument(
        "--repeats", type=positive_int, default=None, help="timed runs per variant (default 7, quick 3)"
    )
    p.add_argument("--warmup", type=non_negative_int, default=1)
    p.add_argument(
        "--backend", default=None, choices=dispatch.BACKENDS, help="default: $UPERNET_FAST_BACKEND or auto"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--threads", type=positive_int, default=None, help="torch.set_num_threads (default: torch's)"
    )
    p.add_argument("--only", default=None, help="comma-separated op names to run")
    args = p.parse_args(argv)
    from upernet_fast.model import resolve_device

    try:
        resolve_device(args.device)
    except ValueError as e:
        p.error(f"--device: {e}")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        p.error(f"--json {args.json}: its folder does not exist")
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 7)
    only = set(args.only.split(",")) if args.only else None
    if only and not only <= set(dispatch.OPS):
        p.error(f"--only: unknown op(s) {sorted(only - set(dispatch.OPS))}; valid: {', '.join(dispatch.OPS)}")

    env = environment(args.device)
    print(
        f"# {env['machine']['platform']} | {env['machine']['cpu_count']} CPUs, {env['machine']['torch_threads']} torch "
        f"threads | {env['machine']['device']} | torch {env['versions']['torch']}, triton {env['versions']['triton']}"
    )
    header = f"{'op':20s} {'shape':38s} {'backend':7s} {'unfused ms':>10s} {'fused ms':>9s} {'ratio':>6s} {'max abs err':>11s}"
    print(header)
    print("-" * len(header))
    results = []
    for case in build_cases(args.quick, args.device, args.backend):
        if only and case.op not in only:
            continue
        backend = dispatch.ops_for(args.backend, args.device).backend_of(case.op)
        t_unfused, t_fused, err = time_pair(case, args.device, repeats, args.warmup)
        ratio = t_unfused / t_fused
        print(
            f"{case.op:20s} {case.shape:38s} {backend:7s} {t_unfused:10.2f} {t_fused:9.2f} {ratio:5.2f}x {err:11.3g}",
            flush=True,
        )
        results.append(
            dict(op=case.op, shape=case.shape, backend=backend, unfused_ms=t_unfused, fused_ms=t_fused, ratio=ratio,
                 max_abs_err=err, note=case.note)
        )  # fmt: skip
    if args.json:
        payload = {**env, "quick": args.quick, "repeats": repeats, "device": args.device, "results": results}
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
