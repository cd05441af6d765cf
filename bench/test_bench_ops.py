"""pytest-benchmark runs of bench_ops.py's cases at its --quick shapes (PyTorch paths on CPU, Triton on CUDA):

    python -m pytest bench/test_bench_ops.py --benchmark-group-by=group

Each case is benchmarked twice, unfused (the plain PyTorch sequence) and fused (the op via dispatch),
grouped so pytest-benchmark prints them side by side. No test asserts a time.
"""

from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("pytest_benchmark", reason="needs pytest-benchmark")

from bench_ops import build_cases  # noqa: E402  (bench/ is on sys.path: pytest prepends this file's folder)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = build_cases(quick=True, device=DEVICE, backend=None)


def _id(case) -> str:
    return re.sub(r"[^0-9A-Za-z_.>-]+", "_", f"{case.op}-{case.shape}")


@pytest.mark.parametrize("variant", ["unfused", "fused"])
@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_op(benchmark, case, variant: str) -> None:
    benchmark.group = f"{case.op} {case.shape}"
    fn = case.fused if variant == "fused" else case.unfused
    with torch.no_grad():
        result = benchmark(fn)
    assert result is not None


@pytest.mark.parametrize(
    "script,argv",
    [
        ("bench_ops", ["--quick", "--repeats", "-1"]),
        ("bench_ops", ["--quick", "--threads", "0"]),
        ("bench_ops", ["--quick", "--json", "/nonexistent-folder/x.json"]),
        ("macs", ["--sizes", "64x"]),
        ("macs", ["--models", "nosuch"]),
        ("e2e", ["--sizes", "16x16"]),
        ("e2e", ["--runs", "0"]),
        ("e2e", ["--batches", "0"]),
        ("e2e", ["--quick", "--runs", "3"]),  # --quick sets them itself: silently ignored before
    ],
)
def test_bad_arguments_are_usage_errors_before_any_measurement(script, argv, capsys):
    """Each of these used to measure for a while and then end in a traceback (or be silently replaced)."""
    import importlib

    with pytest.raises(SystemExit) as stop:
        importlib.import_module(script).main(argv)
    assert stop.value.code == 2 and "error:" in capsys.readouterr().err
