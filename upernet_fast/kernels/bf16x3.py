"""Float32 convolution on AMX as split bfloat16 ("bf16x3"), with a float32 result (CPU).

On a CPU with AMX, oneDNN's bfloat16 3x3 convs run 4-7x faster than its float32 ones (512 channels at
128²: 34 vs 242 ms on a Xeon with AMX-BF16), but a bfloat16 conv rounds its output to 8 significant bits.
Here a float32 conv ``y = conv(x, W) + b`` is rebuilt from bfloat16 convs to about float32 accuracy:

    x = hi + lo,  W = W_hi + W_lo       (hi = bf16(x), lo = bf16(x - hi): 16 significant bits together)
    x W ≈ hi W_hi + hi W_lo + lo W_hi   (the dropped lo W_lo is ~2^-16 of each product)

    y_hi = conv(hi, W_hi)                                        bf16 output, ~2^-8 off y
    r    = conv([hi, hi, lo], [W_hi, W_lo, W_hi]) - y_hi         one conv over 3C channels; oneDNN applies
                                                                 the subtraction to its float32 accumulator
                                                                 (binary post-op), so r is the small
                                                                 remainder, rounded to bf16 relative to ITSELF
    y    = float(y_hi) + float(r) + b                            float32, bias never rounded to bf16

so the result's error is ~2^-17 of y from r's rounding plus the dropped term: measured 3-8e-6 relative to
the output's max at 512 channels (the float32 direct conv: 1-2e-6; Winograd F(6x6): 1e-5). PyTorch's
bfloat16 convs and GEMMs cannot write float32 outputs, hence the remainder pass. Cost: 4 bfloat16 passes,
plus one split and one combine pass over memory (``csrc/bf16x3.c``, or PyTorch ops without the C
helpers). Worth it only where bfloat16 runs over ~4x float32: AMX, large 3x3 convs; whether it runs for
a conv is decided in ``upernet_fast.dispatch.bf16x3_choice`` (measured on the machine, or a default rule).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import native
from ._common import CONV_POINTWISE, onednn_blocker, register_ops
from ._memory import empty_output

__all__ = ["bf16x3_possible", "bf16x3_weight", "conv_bf16x3", "split_bf16", "split_input"]


def bf16x3_possible(x: torch.Tensor) -> bool:
    """Whether ``conv_bf16x3`` can run on ``x``: a channels-last float32 map where oneDNN's fused-post-op
    conv runs (``_common.onednn_blocker``; its bfloat16 convs are only fast with native bf16: the caller
    checks that)."""
    return (
        CONV_POINTWISE is not None
        and onednn_blocker(x) is None
        and x.dtype == torch.float32
        and x.dim() == 4
        and x.permute(0, 2, 3, 1).is_contiguous()
    )


def split_bf16(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) = (bf16(t), bf16(t - hi)) of a float32 tensor: the split every bf16x3 operand gets (the C
    passes compute the same, bitwise)."""
    hi = t.to(torch.bfloat16)
    return hi, (t - hi.float()).to(torch.bfloat16)


def bf16x3_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Cout, Cin, k, k) float32 -> the bfloat16 channels-last weights of the ``y_hi`` pass, ``W_hi``
    (Cout, Cin, k, k), and of the remainder pass, ``[W_hi, W_lo, W_hi]`` (Cout, 3 Cin, k, k); each
    dense, so no call slices or copies them."""
    w_hi, w_lo = split_bf16(weight.float())
    cl = torch.channels_last
    return w_hi.contiguous(memory_format=cl), torch.cat([w_hi, w_lo, w_hi], 1).contiguous(memory_format=cl)


def split_input(x: torch.Tensor, width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, [hi, hi, lo]) of a channels-last float32 map, both channels-last bfloat16 (module docstring),
    ``width`` (default: x's) columns wide, the columns beyond x's zero."""
    B, C, H, W = x.shape
    Wp = W if width is None else width
    cl = torch.channels_last
    x3 = empty_output((B, 3 * C, H, Wp), dtype=torch.bfloat16, device=x.device, memory_format=cl)
    lib = native.library()
    if lib is not None:
        hi = empty_output((B, C, H, Wp), dtype=torch.bfloat16, device=x.device, memory_format=cl)
        lib.bf16x3_split(x.data_ptr(), hi.data_ptr(), x3.data_ptr(), B * H, W, Wp, C, torch.get_num_threads())
        return hi, x3
    hi, lo = (F.pad(t, (0, Wp - W)) for t in split_bf16(x))  # channels-last, as x
    torch.cat([hi, hi, lo], 1, out=x3)
    return hi, x3


def _combine(
    y_hi: torch.Tensor, r: torch.Tensor, bias: torch.Tensor | None, relu: bool, width: int
) -> torch.Tensor:
    """relu?(y_hi + r + bias) as float32, the first ``width`` columns."""
    B, C, H, Wp = y_hi.shape
    y = empty_output(
        (B, C, H, width), dtype=torch.float32, device=y_hi.device, memory_format=torch.channels_last
    )
    cl = torch.channels_last
    lib = native.library()
    if lib is not None and y_hi.is_contiguous(memory_format=cl) and r.is_contiguous(memory_format=cl):
        b = None if bias is None else bias.float().contiguous()
        lib.bf16x3_combine(
            y_hi.data_ptr(), r.data_ptr(), None if b is None else b.data_ptr(), y.data_ptr(),
            B * H, width, Wp, C, int(relu), torch.get_num_threads(),
        )  # fmt: skip
        return y
    torch.add(y_hi[..., :width].float(), r[..., :width].float(), out=y)
    if bias is not None:
        y.add_(bias.float().view(1, -1, 1, 1))
    return y.relu_() if relu else y


def _check(x: torch.Tensor, w_hi: torch.Tensor, w3: torch.Tensor, padding: int) -> None:
    if not bf16x3_possible(x):
        raise ValueError(
            f"conv_bf16x3: expected a channels-last CPU float32 (B, C, H, W) map with oneDNN enabled, got "
            f"{x.dtype} {tuple(x.shape)} on {x.device.type}"
        )
    c = x.shape[1]
    if (
        w_hi.dim() != 4
        or w_hi.dtype != torch.bfloat16
        or w3.dtype != torch.bfloat16
        or w_hi.shape[1] != c
        or tuple(w3.shape) != (w_hi.shape[0], 3 * c, *w_hi.shape[2:])
        or w_hi.shape[2] != w_hi.shape[3]
        or padding != w_hi.shape[2] // 2
    ):
        raise ValueError(
            f"conv_bf16x3: split_weight must be bf16x3_weight() of a (Cout, {c}, k, k) weight with padding "
            f"k // 2, got {w_hi.dtype} {tuple(w_hi.shape)} and {w3.dtype} {tuple(w3.shape)}, padding {padding}"
        )


def conv_bf16x3_torch(
    x: torch.Tensor,
    w_hi: torch.Tensor,
    w3: torch.Tensor,
    bias: torch.Tensor | None,
    padding: int,
    relu: bool,
    width: int | None = None,
) -> torch.Tensor:
    _check(x, w_hi, w3, padding)
    W = x.shape[3]
    width = W if width is None else width
    if width < W:
        raise ValueError(f"conv_bf16x3: width {width} is narrower than the input's {W}")
    hi, x3 = split_input(x, width)
    p, one = [padding, padding], [1, 1]
    y_hi = CONV_POINTWISE(hi, w_hi, None, p, one, one, 1, "none", [], "")
    r = CONV_POINTWISE.binary(x3, y_hi, w3, None, p, one, one, 1, "sub", None, None, [], None)
    return _combine(y_hi, r, bias, relu, W)


def _fake(x, w_hi, w3, bias, padding, relu, width=None):
    shape = (x.shape[0], w_hi.shape[0], *x.shape[2:])  # padding k // 2: same size
    return torch.empty(shape, dtype=torch.float32, device=x.device, memory_format=torch.channels_last)


CONV_BF16X3 = register_ops("conv_bf16x3", {"torch": conv_bf16x3_torch}, _fake)


def conv_bf16x3(
    x: torch.Tensor,
    split_weight: tuple[torch.Tensor, torch.Tensor],
    bias: torch.Tensor | None,
    padding: int,
    relu: bool,
    width: int | None = None,
) -> torch.Tensor:
    """``relu?(conv2d(x, W, bias, padding))`` for a channels-last CPU float32 ``x``, computed as split
    bfloat16 from ``split_weight = bf16x3_weight(W)`` (module docstring); channels-last float32 output.
    ``width``: run the bfloat16 convs on maps this many columns wide (x's width and more), zero beyond x's:
    the same result (the zeros are what the conv's own padding reads), and at some widths oneDNN picks a
    much slower kernel than at a slightly larger one (``tuning.bf16x3_width``)."""
    if not (isinstance(split_weight, tuple | list) and len(split_weight) == 2):
        raise ValueError(
            "conv_bf16x3: split_weight must be bf16x3_weight() of a (Cout, Cin, k, k) weight: the pair "
            f"(W_hi, [W_hi, W_lo, W_hi]), got {type(split_weight).__name__}"
        )
    return CONV_BF16X3["torch"](x, *split_weight, bias, padding, relu, width)
