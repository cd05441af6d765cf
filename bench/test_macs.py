"""bench/macs.py counts MACs from profiler shapes; checked against PyTorch's own FlopCounterMode (FLOPs = 2 x
MACs for convolutions and matrix products) on the transformers model, and on upernet_fast's Winograd path
against the GEMM sizes the Winograd formula gives."""

from __future__ import annotations

import torch
from e2e import build_reference  # bench/ is on sys.path: pytest prepends this file's folder
from macs import count_macs
from torch.utils.flop_counter import FlopCounterMode

import upernet_fast


def test_counts_transformers_macs_like_flop_counter() -> None:
    ref = build_reference("convnext-mini")
    x = torch.randn(1, 3, 96, 128)
    macs, by_op = count_macs(ref, x)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        ref(x)
    assert macs * 2 == counter.get_total_flops(), by_op


def test_counts_winograd_batched_gemms() -> None:
    from upernet_fast.kernels.winograd import conv3x3_winograd, winograd_weight

    x = torch.randn(1, 24, 20, 28).contiguous(memory_format=torch.channels_last)
    u = winograd_weight(torch.randn(16, 24, 3, 3), 4)
    macs, by_op = count_macs(lambda t: conv3x3_winograd(t, u), x)
    tiles = -(-20 // 4) * -(-28 // 4)  # 5 x 7 tiles of 4x4 outputs
    assert by_op == {"aten::bmm": 36 * tiles * 24 * 16}, by_op
    assert macs == 36 * tiles * 24 * 16


def test_fast_model_runs_fewer_macs_than_transformers() -> None:
    ref = build_reference("convnext-mini")
    x = torch.randn(1, 3, 96, 128)
    hf_macs, _ = count_macs(ref, x)
    fast_macs, by_op = count_macs(upernet_fast.load(ref), x)
    assert 0 < fast_macs < hf_macs, by_op
