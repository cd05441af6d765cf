"""End-to-end CPU benchmark: upernet_fast against transformers, in one process, interleaved.

Variants: transformers eager (`hf`), torch.compile(transformers) with inductor freezing (`hf-compile`,
compile time reported apart), upernet_fast (`fast`: default plan, tuned on this machine during the
warm-up), its exact path (`fast-exact`: no Winograd, `load(winograd=False)`; on AMX CPUs its large 3x3 convs
run as bf16x3, ~1e-5 relative), every conv in float32 (`fast-strict`: `winograd=False, bf16x3=False`),
torch.compile(upernet_fast) (`fast-compile`: on CPU this runs the eager forward as one op in the graph,
`dispatch.eager_under_compile`) and the same with the plain ops traced for Inductor
(`fast-compile-traced`: `model.compile_eager = False`, what the default avoids),
transformers and upernet_fast in bfloat16 (`hf-bf16`: `.to(torch.bfloat16)`, `fast-bf16`:
`load(model, dtype=torch.bfloat16)`), ONNX Runtime on transformers' graph (`ort`: exported with
`torch.onnx.export(dynamo=True)` at the benchmarked shape, ORT_ENABLE_ALL, same intra-op threads) and on
upernet_fast's own exported graph (`fast-ort`: `upernet_fast.export_onnx`, dynamic sizes, same session
options): what the low-resolution rewrite buys inside ONNX Runtime. Every timed figure is the median of `--runs` calls after
a warm-up call, the variants taking turns so drift hits all of them alike, with the allocator in its
default state (as a user runs it). Peak memory is measured afterwards, one extra call per variant: the
resident-set growth during the call, sampled every millisecond, after switching glibc to a fixed 128 KiB
mmap threshold and trimming the heap, so every large tensor is fresh memory and freed ones leave the RSS.
(A fixed threshold for the timed calls would page-fault every large intermediate: it slowed upernet_fast
from 1.24 s to 1.88 s at ConvNeXt-T 512x512.) Answers are compared with transformers eager: max |logit difference|
relative to max |logit| and argmax agreement.

    python bench/e2e.py                      # full matrix (long: ~30+ min on 2 cores)
                                             # -> bench/results/e2e-<cpu kind>.json
    python bench/e2e.py --quick              # CI smoke run: tiny configs, no torch.compile
    python bench/e2e.py --keep-memory ...    # every variant with upernet_fast.keep_freed_memory() (glibc
                                             # keeps freed blocks for reuse; rows marked "+keep")
    python bench/e2e.py --models convnext-tiny --sizes 512x512 --batches 1 --variants hf,hf-compile,fast
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import threading
import time
from typing import Any

import torch

MODELS: dict[str, dict[str, Any]] = {
    "convnext-tiny": dict(
        backbone_config=dict(model_type="convnext", hidden_sizes=[96, 192, 384, 768], depths=[3, 3, 9, 3]),
        hidden_size=512,
        num_labels=150,
    ),
    "swin-tiny": dict(
        backbone_config=dict(
            model_type="swin", embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7
        ),
        hidden_size=512,
        num_labels=150,
    ),
    # --quick: small enough for CI
    "convnext-mini": dict(
        backbone_config=dict(model_type="convnext", hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 2, 1]),
        hidden_size=64,
        num_labels=19,
    ),
    "swin-mini": dict(
        backbone_config=dict(
            model_type="swin", embed_dim=16, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8], window_size=7
        ),
        hidden_size=64,
        num_labels=19,
    ),
}
VARIANTS = (
    "hf", "hf-compile", "fast", "fast-compile", "fast-compile-traced", "fast-exact", "fast-strict", "hf-bf16",
    "fast-bf16", "ort", "fast-ort",
)  # fmt: skip
# Baselines each variant's ratio is reported against (when they ran in the same config).
BASELINES = ("hf", "hf-compile", "ort", "hf-bf16")


def memory_measurement_mode() -> Any:
    """Switch glibc to a fixed 128 KiB mmap threshold and trim the heap, so RSS growth during a call is its
    peak memory; returns libc (call `malloc_trim(0)` before each measured call), or None where glibc's
    mallopt is unavailable (peaks then go unreported)."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    m_mmap_threshold = -3
    libc.mallopt(m_mmap_threshold, 128 * 1024)
    libc.malloc_trim(0)
    return libc


class PeakRSS:
    """Peak resident-set growth over a block, sampled from /proc every millisecond."""

    def __init__(self) -> None:
        self.page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def __enter__(self) -> PeakRSS:
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def build_reference(name: str, seed: int = 0):
    """transformers UperNet with random weights and realistic BatchNorm statistics (calibrated on noise)."""
    from transformers import AutoConfig, UperNetConfig, UperNetForSemanticSegmentation

    spec = MODELS[name]
    bb = dict(spec["backbone_config"])
    bb_cfg = AutoConfig.for_model(
        bb.pop("model_type"), out_features=["stage1", "stage2", "stage3", "stage4"], **bb
    )
    torch.manual_seed(seed)
    cfg = UperNetConfig(
        backbone_config=bb_cfg, hidden_size=spec["hidden_size"], num_labels=spec["num_labels"]
    )
    model = UperNetForSemanticSegmentation(cfg)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the calibration batch
    model.train()
    with torch.no_grad():
        model(torch.randn(2, 3, 256, 256))
    return model.eval()


def machine_info() -> dict[str, Any]:
    import numpy
    import transformers

    from upernet_fast import dispatch
    from upernet_fast.kernels import native

    def version(name: str) -> str | None:
        try:
            return __import__(name).__version__
        except ImportError:
            return None

    flags = native.cpu_flags()
    return dict(
        platform=platform.platform(),
        cpu=native.cpu_model(),
        cpu_kind=cpu_kind(),
        isa=native.isa(),
        isa_flags=sorted(f for f in flags if f.startswith(("avx", "amx", "fma"))),
        # ISA caps in force (UPERNET_FAST_ISA and PyTorch's, oneDNN's, MKL's own): flags above are then hidden
        isa_caps={
            k: os.environ[k]
            for k in (
                "UPERNET_FAST_ISA",
                "ATEN_CPU_CAPABILITY",
                "ONEDNN_MAX_CPU_ISA",
                "MKL_ENABLE_INSTRUCTIONS",
            )
            if os.environ.get(k)
        },
        native_bf16=dispatch.native_bf16(),
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        python=platform.python_version(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        triton=version("triton"),
        onnxruntime=version("onnxruntime"),
        numpy=numpy.__version__,
        backend="torch (CPU)",
    )


def cpu_kind() -> str:
    """A short name for the kind of CPU (one results file per kind): vendor, vector ISA, AMX."""
    from upernet_fast.kernels import native
    from upernet_fast.kernels._common import isa_cap

    model = native.cpu_model().lower()
    vendor = "amd" if ("amd" in model or "epyc" in model) else "intel" if "intel" in model else "cpu"
    amx = "-amx" if "amx_bf16" in native.cpu_flags() else ""
    capped = "-capped" if isa_cap() is not None else ""  # UPERNET_FAST_ISA: a lesser CPU, emulated
    return f"{vendor}-{native.isa()}{amx}{capped}"


def ort_runner(ref: torch.nn.Module, x: torch.Tensor) -> Any:
    """transformers' model exported with the dynamo exporter at x's shape, run by ONNX Runtime with
    ORT_ENABLE_ALL and torch's thread count; returns a function giving the logits as a tensor."""
    import onnxruntime as ort

    class Logits(torch.nn.Module):
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            return self.model(pixel_values).logits

    path = os.path.join(tempfile.mkdtemp(prefix="upernet_ort_"), "hf.onnx")
    torch.onnx.export(
        Logits(ref), (x,), path, dynamo=True, input_names=["pixel_values"], output_names=["logits"]
    )
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.inter_op_num_threads = 1
    # no spinning after a run: spinning threads kept both cores busy into the next (PyTorch) measurement
    # of an interleaved benchmark (seen: 10 ms forwards timed 5-90x slower after an ORT run)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    return lambda: torch.from_numpy(session.run(None, feed)[0])


def run_config(
    model_name: str,
    size: tuple[int, int],
    batch: int,
    variants: list[str],
    runs: int,
    keep_memory: bool = False,
) -> dict:
    import upernet_fast

    if keep_memory and not upernet_fast.keep_freed_memory():  # before any model: every variant runs with it
        raise SystemExit("--keep-memory: glibc's mallopt is not available here")
    ref = build_reference(model_name)
    fast = upernet_fast.load(ref)
    x = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(1))
    fns: dict[str, Any] = {}
    compile_s: dict[str, float] = {}
    if "hf" in variants:
        fns["hf"] = lambda: ref(x).logits
    if "fast" in variants:
        fns["fast"] = lambda: fast(x).logits
    if "fast-exact" in variants:
        exact = upernet_fast.load(ref, winograd=False)
        fns["fast-exact"] = lambda: exact(x).logits
    if "fast-strict" in variants:
        strict = upernet_fast.load(ref, winograd=False, bf16x3=False)
        fns["fast-strict"] = lambda: strict(x).logits
    if "hf-bf16" in variants or "fast-bf16" in variants:
        import copy

        xb = x.bfloat16()
        if "hf-bf16" in variants:
            ref_bf16 = copy.deepcopy(ref).to(torch.bfloat16)
            fns["hf-bf16"] = lambda: ref_bf16(xb).logits
        if "fast-bf16" in variants:
            fast_bf16 = upernet_fast.load(ref, dtype=torch.bfloat16)
            fns["fast-bf16"] = lambda: fast_bf16(xb).logits
    failed: dict[str, str] = {}
    if "ort" in variants:
        t = time.perf_counter()
        try:
            fns["ort"] = ort_runner(ref, x)
            compile_s["ort"] = time.perf_counter() - t
        except Exception as e:  # noqa: BLE001 - the exporter raises many kinds; the row records why
            reason = re.sub(r"\x1b\[[0-9;]*m", "", str(e).splitlines()[0])[:200]  # no terminal colours
            failed["ort"] = f"export of transformers' model failed: {type(e).__name__}: {reason}"
            print(f"ort: {failed['ort']}", file=sys.stderr)
    if "fast-ort" in variants:
        t = time.perf_counter()
        path = upernet_fast.export_onnx(
            fast, os.path.join(tempfile.mkdtemp(prefix="upernet_ort_"), "fast.onnx")
        )
        session = upernet_fast.ort_session(path, threads=torch.get_num_threads())
        feed = {"pixel_values": x.numpy()}
        fns["fast-ort"] = lambda: torch.from_numpy(session.run(["logits"], feed)[0])
        compile_s["fast-ort"] = time.perf_counter() - t
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    if "hf-compile" in variants:
        compiled_ref = torch.compile(ref)
        fns["hf-compile"] = lambda: compiled_ref(x).logits
    if "fast-compile" in variants:
        compiled_fast = torch.compile(fast)
        fns["fast-compile"] = lambda: compiled_fast(x).logits
    if "fast-compile-traced" in variants:
        traced = upernet_fast.load(ref)
        traced.compile_eager = False
        compiled_traced = torch.compile(traced)
        fns["fast-compile-traced"] = lambda: compiled_traced(x).logits

    times: dict[str, list[float]] = {v: [] for v in fns}
    peaks: dict[str, float] = {}
    outputs: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for v, fn in fns.items():  # warm-up (and compilation)
            t = time.perf_counter()
            outputs[v] = fn().float().clone()
            if "compile" in v:
                compile_s[v] = time.perf_counter() - t
            elif v.startswith("fast") and v != "fast-ort":  # first call: tuning (once per machine) + folding
                compile_s[v] = time.perf_counter() - t
        for _ in range(runs):
            for v, fn in fns.items():
                t = time.perf_counter()
                fn()
                times[v].append(time.perf_counter() - t)
        libc = memory_measurement_mode()
        if libc is not None:
            for v, fn in fns.items():
                upernet_fast.empty_cache()  # fast rows: their cached buffers count in the peak
                libc.malloc_trim(0)
                with PeakRSS() as mem:
                    fn()
                peaks[v] = mem.growth_mb
    reference = outputs.get("hf")
    rows = []
    bases = {b: statistics.median(times[b]) for b in BASELINES if b in times}
    for v in fns:
        med = statistics.median(times[v])
        row: dict[str, Any] = dict(
            model=model_name,
            size=f"{size[0]}x{size[1]}",
            batch=batch,
            variant=v,
            keep_freed_memory=keep_memory,
            median_s=med,
            runs_s=times[v],
            peak_mb=peaks.get(v),
            speedup_vs_hf=(bases["hf"] / med) if "hf" in bases else None,
            speedup_vs_hf_compile=(bases["hf-compile"] / med) if "hf-compile" in bases else None,
            speedup_vs_ort=(bases["ort"] / med) if "ort" in bases else None,
            speedup_vs_hf_bf16=(bases["hf-bf16"] / med) if "hf-bf16" in bases else None,
            compile_s=compile_s.get(v),
        )
        if v == "fast":
            row["plan"] = fast.plan(*size, batch=batch)
        if reference is not None:
            out = outputs[v]
            diff = (out - reference).abs().max().item()
            scale = reference.abs().max().item()
            row.update(
                max_abs_diff=diff,
                rel_diff=diff / scale,
                argmax_agree=(out.argmax(1) == reference.argmax(1)).float().mean().item(),
            )
        rows.append(row)
    for v, error in failed.items():
        rows.append(
            dict(
                model=model_name,
                size=f"{size[0]}x{size[1]}",
                batch=batch,
                variant=v,
                keep_freed_memory=keep_memory,
                error=error,
            )  # fmt: skip
        )
    return dict(rows=rows)


def run_config_isolated(
    model_name: str, size: tuple[int, int], batch: int, variants: list[str], runs: int, keep_memory: bool
) -> dict:
    """`run_config` in a fresh interpreter: the memory pass changes the allocator for good, and compile
    caches or heap growth from one config must not bleed into the next one's timings."""
    import subprocess

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        spec = json.dumps(
            dict(
                model=model_name, size=list(size), batch=batch, variants=variants, runs=runs, keep=keep_memory
            )
        )
        subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--one-config", spec, "--json", out], check=True
        )
        with open(out) as f:
            return json.load(f)


def format_table(rows: list[dict]) -> str:
    head = (
        "| model | size | batch | variant | median s | x hf eager | x hf compile | x ort | x hf bf16 | "
        "peak MB | max abs diff (rel) | argmax agree | compile/first s |"
    )
    lines = [head, "|" + "---|" * 13]
    for r in rows:

        def fmt(v: Any, spec: str) -> str:
            return "-" if v is None else format(v, spec)

        variant = r["variant"] + ("+keep" if r.get("keep_freed_memory") else "")
        if "error" in r:
            lines.append(f"| {r['model']} | {r['size']} | {r['batch']} | {variant} | failed: {r['error']} |")
            continue

        rel = f"{r['max_abs_diff']:.2e} ({r['rel_diff']:.1e})" if "max_abs_diff" in r else "-"
        agree = f"{100 * r['argmax_agree']:.3f}%" if "argmax_agree" in r else "-"
        lines.append(
            f"| {r['model']} | {r['size']} | {r['batch']} | {variant} | {r['median_s']:.3f} | "
            f"{fmt(r['speedup_vs_hf'], '.2f')} | {fmt(r['speedup_vs_hf_compile'], '.2f')} | "
            f"{fmt(r.get('speedup_vs_ort'), '.2f')} | {fmt(r.get('speedup_vs_hf_bf16'), '.2f')} | "
            f"{fmt(r['peak_mb'], '.0f')} | {rel} | {agree} | {fmt(r['compile_s'], '.1f')} |"
        )
    return "\n".join(lines)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1 (a bad value is a usage error, not a traceback later)."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    return _int_at_least(text, 0)


def size_list(text: str) -> list[tuple[int, int]]:
    """argparse type: comma-separated HxW sizes (the CLI's parser), each side at least the CLI's
    ``MIN_SIDE``, the backbones' total stride."""
    from upernet_fast.cli import MIN_SIDE, _size

    sizes = [_size(t) for t in text.split(",") if t]
    small = [f"{h}x{w}" for h, w in sizes if min(h, w) < MIN_SIDE]
    if small:
        raise argparse.ArgumentTypeError(f"{small[0]}: each side must be at least {MIN_SIDE} pixels")
    if not sizes:
        raise argparse.ArgumentTypeError("expected at least one size")
    return sizes


def positive_int_list(text: str) -> list[int]:
    values = [positive_int(t) for t in text.split(",") if t]
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="convnext-tiny,swin-tiny")
    p.add_argument("--sizes", type=size_list, default="512x512,512x683")
    p.add_argument("--batches", type=positive_int_list, default="1,4")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--runs", type=positive_int, default=3)
    p.add_argument("--json", default=None, help="JSON results (default: bench/results/e2e-<cpu kind>.json)")
    p.add_argument(
        "--append",
        action="store_true",
        help="keep the rows already in --json (same machine record only), replacing re-measured ones",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="CI smoke run: tiny models, every variant but the compiled ones, 2 runs",
    )
    p.add_argument(
        "--keep-memory",
        action="store_true",
        help="call upernet_fast.keep_freed_memory() first (process-wide: transformers runs with it too); "
        "rows are marked '+keep'",
    )
    p.add_argument("--one-config", help=argparse.SUPPRESS)  # internal: one config, in this process
    args = p.parse_args(argv)
    if args.one_config:
        spec = json.loads(args.one_config)
        result = run_config(
            spec["model"], tuple(spec["size"]), spec["batch"], spec["variants"], spec["runs"], spec["keep"]
        )
        with open(args.json, "w") as f:
            json.dump(result, f)
        return 0
    if args.quick:
        given = sys.argv[1:] if argv is None else argv
        keys = ("--models", "--sizes", "--batches", "--variants", "--runs")
        chosen = [k for k in keys if any(a == k or a.startswith(k + "=") for a in given)]
        if chosen:
            p.error(
                f"--quick sets the models, sizes, batches, variants and runs itself; drop {' '.join(chosen)}"
            )
        args.models, args.sizes, args.batches, args.variants, args.runs = (
            "convnext-mini,swin-mini",
            [(96, 128)],
            [1],
            "hf,fast,fast-exact,hf-bf16,fast-bf16,ort,fast-ort",
            2,
        )
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS)) + sorted(set(args.models.split(",")) - set(MODELS))
    if unknown:
        p.error(f"unknown variant/model {unknown}; variants: {VARIANTS}, models: {sorted(MODELS)}")
    info = machine_info()
    print("machine:", json.dumps(info), flush=True)
    if args.json is None:  # a smoke run never replaces the recorded results
        folder = tempfile.gettempdir() if args.quick else "bench/results"
        args.json = os.path.join(folder, f"e2e-{'quick-' if args.quick else ''}{info['cpu_kind']}.json")
    rows: list[dict] = []
    for model_name in args.models.split(","):
        for size in args.sizes:
            for batch in args.batches:
                result = run_config_isolated(model_name, size, batch, variants, args.runs, args.keep_memory)
                rows.extend(result["rows"])
                print(format_table(result["rows"]), flush=True)
    if args.append and args.json and os.path.exists(args.json):
        with open(args.json) as f:
            previous = json.load(f)
        if previous.get("machine", {}).get("cpu") != info["cpu"]:
            p.error(f"{args.json} was measured on {previous.get('machine', {}).get('cpu')!r}, not this CPU")
        key = lambda r: (r["model"], r["size"], r["batch"], r["variant"], r.get("keep_freed_memory", False))  # noqa: E731
        fresh = {key(r) for r in rows}
        rows = [r for r in previous["rows"] if key(r) not in fresh] + rows
    table = format_table(rows)
    print("\n" + table)
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(dict(machine=info, args=vars(args), rows=rows, table=table), f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
