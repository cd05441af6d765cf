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


def test_counts_the_bf16x3_gemms() -> None:
    """The split-bfloat16 ops call MKL from C (no PyTorch GEMM op inside): the ops themselves are counted,
    3 bfloat16 MACs per float32 MAC."""
    from upernet_fast.kernels import gemm_bf16x3 as mx

    if mx.gemm_bf16x3_blocker(torch.zeros(1)) is not None:
        import pytest

        pytest.skip("needs the C helpers and MKL's bf16 GEMM")
    x = torch.randn(2, 24, 5, 7).contiguous(memory_format=torch.channels_last)
    w1, w2, p = torch.randn(40, 24), torch.randn(24, 40), mx.pack_weight(torch.randn(16, 24))
    macs, by_op = count_macs(lambda t: mx.conv1x1_bf16x3(t, p, None, False), x)
    assert by_op == {"upernet_fast::conv1x1_bf16x3_torch": 2 * 5 * 7 * 3 * 24 * 16}, by_op
    y = torch.empty_like(x)
    p1, p2, b1, b2 = mx.pack_weight(w1), mx.pack_weight(w2), torch.zeros(40), torch.zeros(24)
    macs, by_op = count_macs(lambda t: mx.mlp_bf16x3_(y.copy_(t), t, p1, b1, p2, b2, 1e-6), x)
    assert by_op == {"upernet_fast::mlp_bf16x3_torch": 2 * 5 * 7 * 3 * 2 * 24 * 40}, by_op
    if mx.amx_gemm_available():  # our AMX kernel's tiles hold 2K x N but it runs the same 3 products
        x = torch.randn(2, 32, 5, 7).contiguous(memory_format=torch.channels_last)
        tiles = mx.pack_weight(torch.randn(64, 32), amx=True)
        macs, by_op = count_macs(lambda t: mx.conv1x1_bf16x3(t, tiles, None, False), x)
        assert by_op == {"upernet_fast::conv1x1_bf16x3_torch": 2 * 5 * 7 * 3 * 32 * 64}, by_op
