"""How far each implementation is from this CPU's GEMM peak: multiply-accumulates run, time, GMAC/s.

Counts the MACs of every GEMM and convolution a forward runs (transformers eager, upernet_fast's default and
exact paths; bf16 too with --bf16), from the shapes the PyTorch profiler records, including the ops inside
upernet_fast's custom ops (Winograd's batched GEMMs, the tap GEMMs). Then times each forward (median of
--runs, interleaved) and measures the machine's fp32 peak two ways: MKL sgemm 2048^3 and oneDNN's direct
3x3 conv 512->512 at 64x64, channels-last. The result says which speed-up targets the MAC counts allow:
at equal GMAC/s, fast x reference = reference MACs / fast MACs.

    python bench/macs.py --models convnext-tiny --sizes 512x512 --json bench/results/macs-<cpu kind>.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.profiler import profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e import MODELS, build_reference, machine_info, positive_int, size_list  # noqa: E402

import upernet_fast  # noqa: E402

_CONVS = ("aten::mkldnn_convolution", "mkldnn::_convolution_pointwise", "aten::_slow_conv2d_forward")


def _split_macs(packed: list[int]) -> int:
    """bfloat16 MACs per row of a bf16x3 GEMM with this ``pack_weight`` result: 3K x N in either layout
    (MKL's (3K, N) rows; our AMX kernel's (N/16, 2K/32, 16, 32) tiles hold [W_hi; W_lo], 2K x N, and it
    still runs the three products)."""
    return math.prod(packed) * 3 // 2 if len(packed) == 4 else math.prod(packed)


def event_macs(name: str, shapes: list[list[int]]) -> int:
    """MACs of one recorded op from its input shapes (0 for ops that are not GEMMs or convolutions)."""
    if name == "aten::mm":
        return shapes[0][0] * shapes[0][1] * shapes[1][1]
    if name in ("aten::addmm", "aten::addmm_"):
        return shapes[1][0] * shapes[1][1] * shapes[2][1]
    if name == "aten::bmm":
        return shapes[0][0] * shapes[0][1] * shapes[0][2] * shapes[1][2]
    if name in _CONVS:
        # (x, weight, ...); the binary pointwise variant is (x, other, weight, ...)
        weight = shapes[2] if len(shapes) > 2 and len(shapes[2]) == 4 else shapes[1]
        b, _, h, w = shapes[0]
        cout, cin_per_group, kh, kw = weight
        # The only strided convs in these models are the patchify/downsampling ones (stride = kernel).
        stride = kh if kh == kw and kh in (2, 4) and cin_per_group == shapes[0][1] else 1
        return b * cout * cin_per_group * kh * kw * (h // stride) * (w // stride)
    # split-bfloat16 GEMMs on AMX (upernet_fast/kernels/gemm_bf16x3.py): our AMX kernel or MKL called from C,
    # so the op itself is counted, in bfloat16 MACs (3 per float32 MAC), as conv_bf16x3's oneDNN passes are
    if name == "upernet_fast::mlp_bf16x3_torch":  # (y, x, w1, b1, w2, b2, eps)
        rows = shapes[0][0] * shapes[0][2] * shapes[0][3]
        return rows * (_split_macs(shapes[2]) + _split_macs(shapes[4]))
    if name == "upernet_fast::conv1x1_bf16x3_torch":  # (x, packed, bias, relu)
        return shapes[0][0] * shapes[0][2] * shapes[0][3] * _split_macs(shapes[1])
    if name == "mkldnn::_linear_pointwise":
        return math.prod(shapes[0][:-1]) * shapes[0][-1] * shapes[1][0]
    if name == "aten::_scaled_dot_product_flash_attention_for_cpu":
        q, k = shapes[0], shapes[1]
        return 2 * math.prod(q[:-1]) * k[-2] * q[-1]
    return 0


def count_macs(model: Callable[[torch.Tensor], Any], x: torch.Tensor) -> tuple[int, dict[str, int]]:
    with torch.no_grad():
        model(x)  # warm-up: plans, caches, tuning
        with profile(record_shapes=True) as prof:
            model(x)
    by_op: dict[str, int] = {}
    for event in prof.events():
        macs = event_macs(event.name, event.input_shapes)
        if macs:
            by_op[event.name] = by_op.get(event.name, 0) + macs
    return sum(by_op.values()), by_op


def median_seconds(fn, runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def fp32_peaks(runs: int) -> dict[str, float]:
    """Practical fp32 GMAC/s of this CPU: MKL sgemm and oneDNN's direct 3x3 conv."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    x = torch.randn(1, 512, 64, 64).contiguous(memory_format=torch.channels_last)
    w = torch.randn(512, 512, 3, 3)
    with torch.no_grad():
        sgemm = median_seconds(lambda: a @ b, runs)
        conv = median_seconds(lambda: F.conv2d(x, w, padding=1), runs)
    return {
        "mkl_sgemm_2048": 2048**3 / sgemm / 1e9,
        "onednn_conv3x3_512_64px": 64 * 64 * 512 * 512 * 9 / conv / 1e9,
    }


def measure(name: str, size: tuple[int, int], runs: int, bf16: bool) -> dict[str, Any]:
    ref = build_reference(name).eval()
    x = torch.randn(1, 3, *size)
    variants: dict[str, tuple[torch.nn.Module, torch.Tensor]] = {
        "hf": (ref, x),
        "fast": (upernet_fast.load(ref), x),
        "fast-exact": (upernet_fast.load(ref, winograd=False), x),
    }
    if bf16:
        variants["hf-bf16"] = (build_reference(name).eval().to(torch.bfloat16), x.bfloat16())
        variants["fast-bf16"] = (upernet_fast.load(ref, dtype=torch.bfloat16), x.bfloat16())
    rows: dict[str, dict[str, Any]] = {}
    for key, (model, inp) in variants.items():
        macs, by_op = count_macs(model, inp)
        rows[key] = {"gmac": macs / 1e9, "gmac_by_op": {k: v / 1e9 for k, v in by_op.items()}, "times": []}
    with torch.no_grad():
        for _ in range(runs):  # interleaved
            for key, (model, inp) in variants.items():
                start = time.perf_counter()
                model(inp)
                rows[key]["times"].append(time.perf_counter() - start)
    for row in rows.values():
        row["seconds"] = statistics.median(row["times"])
        row["gmac_per_s"] = row["gmac"] / row["seconds"]
    for key in [k for k in rows if k.startswith("fast")]:
        ref_key = "hf-bf16" if key.endswith("bf16") else "hf"
        row, ref_row = rows[key], rows[ref_key]
        row["x_reference"] = ref_row["seconds"] / row["seconds"]
        row["x_reference_at_equal_gmac_per_s"] = ref_row["gmac"] / row["gmac"]
    return {"model": name, "size": f"{size[0]}x{size[1]}", "variants": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="convnext-tiny")
    parser.add_argument("--sizes", type=size_list, default="512x512")
    parser.add_argument("--runs", type=positive_int, default=3)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--bf16", action="store_true", help="also transformers-bf16 and upernet_fast bf16")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.models.split(",")) - set(MODELS))
    if unknown:  # before the peak measurement, not after it
        parser.error(f"unknown model(s) {unknown}; models: {sorted(MODELS)}")
    if args.json and not Path(args.json).resolve().parent.is_dir():
        parser.error(f"--json {args.json}: its folder does not exist")
    torch.set_num_threads(args.threads)
    result = {"machine": machine_info(), "fp32_peak_gmac_per_s": fp32_peaks(5), "configs": []}
    print("fp32 peak GMAC/s:", {k: round(v) for k, v in result["fp32_peak_gmac_per_s"].items()})
    for name in args.models.split(","):
        for h, w in args.sizes:
            config = measure(name, (h, w), args.runs, args.bf16)
            result["configs"].append(config)
            print(f"{name} {h}x{w}")
            for key, row in config["variants"].items():
                extra = ""
                if "x_reference" in row:
                    extra = f"  x ref {row['x_reference']:.2f} (MAC ratio {row['x_reference_at_equal_gmac_per_s']:.2f})"
                print(
                    f"  {key:11s} {row['gmac']:7.1f} GMAC  {row['seconds'] * 1e3:7.1f} ms"
                    f"  {row['gmac_per_s']:6.1f} GMAC/s{extra}"
                )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
