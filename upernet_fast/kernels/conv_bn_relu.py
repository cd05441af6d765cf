"""Conv2d (stride 1, 1x1 or 3x3, zero padding) with BatchNorm folded in and bias + ReLU in the epilogue.

Replaces UPerNet's conv module ``relu(bn(conv(x)))`` (Conv2d(bias=False) -> BatchNorm2d(eps) -> ReLU), in
inference mode. BatchNorm is affine per output channel, so it folds into the conv exactly:

    s = gamma / sqrt(running_var + eps)
    W' = W * s[o]            b' = (b - running_mean) * s + beta      (b = 0 when the conv has no bias)

computed in float64 and cast back, so the folded conv is as close to the original as one rounding allows.

Triton: implicit GEMM. Each program owns a tile of (BLOCK_P output pixels) x (BLOCK_N output channels)
of one image and loops over taps x input-channel blocks, multiplying an im2col tile of x
(BLOCK_P x BLOCK_K, gathered with zero padding by masks) with a weight tile (BLOCK_K x BLOCK_N);
accumulation in float32 (``input_precision="ieee"``: true fp32, never TF32). Bias and ReLU are applied to
the accumulator before the single store.

PyTorch path: ``F.conv2d(x, W', b')`` followed by an in-place ReLU (oneDNN on CPU; on a channels-last CPU
float32/bfloat16 input, oneDNN's convolution with the ReLU fused as a post-op instead); large, wide 1x1 convs
on channels-last input as one GEMM into a huge-page output (``gemm_by_default``: MKL in float32, oneDNN/AMX in
bfloat16); or, when the caller passes
``winograd_weight`` (a 3x3, padding-1 conv whose weight went through ``winograd_weight()``), the Winograd
F(4x4, 3x3) / F(6x6, 3x3) convolution of ``winograd.py`` (not exact: see its error figures; whether and which
is decided in ``upernet_fast.dispatch.winograd_choice``). The Triton path ignores ``winograd_weight``. The fused
ReLU post-op is bitwise the same as conv then ReLU; it saves a pass over the output, which matters in
bfloat16 (AMX convs are fast, the separate ReLU is not), and channels-last input is what makes the 1x1 convs
fast (bench/results/decisions.md, "conv_bn_relu").
"""

import torch
import torch.nn.functional as F

from ._common import CONV_POINTWISE as _CONV_POINTWISE
from ._common import check_triton_tensors, onednn_blocker, out_memory_format, register_ops, tl, triton
from ._memory import MIN_BYTES, empty_output
from .fpn import topdown_add_torch, topdown_add_triton
from .winograd import check_low, conv3x3_winograd

__all__ = ["conv_bn_relu", "conv_bn_relu_triton", "conv_bn_relu_torch"]


@triton.jit
def _conv_bn_relu_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr,
    C_in, H, W, C_out, H_out, W_out,
    sx_b, sx_c, sx_h, sx_w,
    sw_o, sw_i, sw_h, sw_w,
    sy_b, sy_c, sy_h, sy_w,
    KSIZE: tl.constexpr, PAD: tl.constexpr, HAS_BIAS: tl.constexpr, RELU: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_p = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)

    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    p_mask = offs_p < H_out * W_out
    n_mask = offs_n < C_out
    oy = offs_p // W_out
    ox = offs_p % W_out

    x_img = x_ptr + b * sx_b
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for ky in tl.static_range(KSIZE):
        for kx in tl.static_range(KSIZE):
            iy = oy + (ky - PAD)
            ix = ox + (kx - PAD)
            # Zero padding: taps outside the image are masked to 0 (their addresses are never read).
            pix_ok = p_mask & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
            x_pix = x_img + iy * sx_h + ix * sx_w
            w_tap = w_ptr + ky * sw_h + kx * sw_w + offs_n * sw_o
            for k0 in range(0, C_in, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_mask = offs_k < C_in
                a = tl.load(
                    x_pix[:, None] + offs_k[None, :] * sx_c, mask=pix_ok[:, None] & k_mask[None, :], other=0.0
                )
                w = tl.load(
                    w_tap[None, :] + offs_k[:, None] * sw_i, mask=k_mask[:, None] & n_mask[None, :], other=0.0
                )
                acc = tl.dot(a, w, acc, input_precision="ieee")

    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if RELU:
        acc = tl.maximum(acc, 0.0)
    y = y_ptr + b * sy_b + (oy * sy_h + ox * sy_w)[:, None] + offs_n[None, :] * sy_c
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=p_mask[:, None] & n_mask[None, :])


def _out_shape(x: torch.Tensor, weight: torch.Tensor, padding: int) -> tuple[int, int, int, int]:
    if (
        x.dim() != 4
        or weight.dim() != 4
        or weight.shape[2] != weight.shape[3]
        or weight.shape[2] not in (1, 3)
    ):
        raise ValueError(f"conv_bn_relu: expected NCHW x and a 1x1 or 3x3 weight, got {tuple(weight.shape)}")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"conv_bn_relu: weight has {weight.shape[1]} input channels, x has {x.shape[1]}")
    k = weight.shape[2]
    return x.shape[0], weight.shape[0], x.shape[2] + 2 * padding - k + 1, x.shape[3] + 2 * padding - k + 1


def conv_bn_relu_triton(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, padding: int, relu: bool
) -> torch.Tensor:
    check_triton_tensors(x, weight)
    B, C_out, H_out, W_out = _out_shape(x, weight, padding)
    weight = weight.to(x.dtype)  # tl.dot wants equal operand types; accumulation is fp32 regardless
    y = torch.empty(
        (B, C_out, H_out, W_out), device=x.device, dtype=x.dtype, memory_format=out_memory_format(x)
    )
    BLOCK_P, BLOCK_N, BLOCK_K = 64, 64, 32
    grid = (triton.cdiv(H_out * W_out, BLOCK_P), triton.cdiv(C_out, BLOCK_N), B)
    _conv_bn_relu_kernel[grid](
        x, weight, bias if bias is not None else weight, y,
        x.shape[1], x.shape[2], x.shape[3], C_out, H_out, W_out,
        *x.stride(), *weight.stride(), *y.stride(),
        KSIZE=weight.shape[2], PAD=padding, HAS_BIAS=bias is not None, RELU=relu,
        BLOCK_P=BLOCK_P, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
    )  # fmt: skip
    return y


def _check_winograd(weight: torch.Tensor, padding: int, winograd_weight: torch.Tensor | None) -> None:
    if winograd_weight is None:
        return
    c_out, c_in, k, _ = weight.shape
    if k != 3 or padding != 1 or tuple(winograd_weight.shape) not in ((36, c_in, c_out), (64, c_in, c_out)):
        raise ValueError(
            f"conv_bn_relu: winograd_weight needs a 3x3 kernel with padding 1 and shape (36 or 64, {c_in}, "
            f"{c_out}), "
            f"got kernel {k}x{k}, padding {padding}, winograd_weight {tuple(winograd_weight.shape)}"
        )


def _torch_out_format(x: torch.Tensor, winograd_weight: torch.Tensor | None) -> torch.memory_format:
    # The Winograd path scatters output tiles as channel vectors: channels-last output, whatever the input.
    return torch.channels_last if winograd_weight is not None else out_memory_format(x)


def gemm_possible(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a 1x1 conv of ``x`` can run as one GEMM: CPU float32/bfloat16, channels-last input."""
    return (
        weight.shape[2:] == (1, 1)
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and x.permute(0, 2, 3, 1).is_contiguous()
    )


def gemm_by_default(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """The default rule for running a 1x1 conv as one GEMM into a huge-page output (``_conv1x1_gemm``)
    instead of oneDNN: a large output (its page faults otherwise dominate) and at least 256 output
    channels, where the GEMM measured faster (bench/results/decisions.md, "_gemm_1x1")."""
    b, c_out, h, w = x.shape[0], weight.shape[0], x.shape[2], x.shape[3]
    return gemm_possible(x, weight) and c_out >= 256 and b * c_out * h * w * 4 >= MIN_BYTES


def onednn_weight_useful(x: torch.Tensor, weight: torch.Tensor, gemm: bool | None) -> bool:
    """Whether ``conv_bn_relu_torch`` would run ``x`` on oneDNN's conv (not the 1x1 GEMM, not Winograd), in
    eager inference: then an ``onednn_weight`` prepacked once saves the conv's per-call weight reorder."""
    if gemm_possible(x, weight) and (gemm_by_default(x, weight) if gemm is None else gemm):
        return False
    return _relu_post_op_possible(x) and not torch.is_grad_enabled()


def _relu_post_op_possible(x: torch.Tensor) -> bool:
    """Whether oneDNN's conv with a fused ReLU post-op runs on ``x``: eager, CPU float32, or bfloat16 on a
    CPU with native bf16 (``onednn_blocker``), channels-last (its output is channels-last, as
    ``F.conv2d``'s is for that input), oneDNN on."""
    return (
        _CONV_POINTWISE is not None
        and onednn_blocker(x) is None
        and x.dtype in (torch.float32, torch.bfloat16)
        and out_memory_format(x) == torch.channels_last
    )


def _conv1x1_gemm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, relu: bool
) -> torch.Tensor:
    """1x1 conv of channels-last ``x`` as (pixels x Cin) @ (Cin x Cout); channels-last output."""
    b, c_in, h, w = x.shape
    c_out = weight.shape[0]
    out = empty_output((b, h, w, c_out), dtype=x.dtype, device=x.device)
    rows, w2d = x.permute(0, 2, 3, 1).reshape(-1, c_in), weight.to(x.dtype).view(c_out, c_in).t()
    if bias is None:
        torch.mm(rows, w2d, out=out.view(-1, c_out))
    else:
        torch.addmm(bias.to(x.dtype), rows, w2d, out=out.view(-1, c_out))
    if relu:
        out.relu_()
    return out.permute(0, 3, 1, 2)


def conv1x1_nchw_possible(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``conv1x1_to_nchw`` runs: a 1x1 conv of a channels-last CPU float32 map, eager inference."""
    return (
        gemm_possible(x, weight)
        and x.dtype == torch.float32
        and weight.dtype == torch.float32
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
    )


def conv1x1_to_nchw(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """1x1 conv of a channels-last float32 ``x`` into a contiguous NCHW output, as ``W @ Xᵀ`` per image
    (MKL reads the channels-last pixels transposed): for the classifier, whose logits are resized from
    NCHW (bench/results/decisions.md, "Logits layout"); oneDNN's channels-last output plus a copy took
    13.1 ms against 8.4 ms for 512->150 at 128² (Xeon, 2 threads)."""
    b, c_in, h, w = x.shape
    c_out = weight.shape[0]
    out = empty_output((b, c_out, h, w), dtype=x.dtype, device=x.device)
    w2d = weight.view(c_out, c_in)
    for i in range(b):
        pixels = x[i].permute(1, 2, 0).reshape(h * w, c_in)  # a view: x is channels-last
        if bias is None:
            torch.mm(w2d, pixels.t(), out=out[i].view(c_out, h * w))
        else:
            torch.addmm(bias.view(c_out, 1), w2d, pixels.t(), out=out[i].view(c_out, h * w))
    return out


def conv_bn_relu_torch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    padding: int,
    relu: bool,
    winograd_weight: torch.Tensor | None = None,
    gemm: bool | None = None,
    onednn_weight: torch.Tensor | None = None,
    low: torch.Tensor | None = None,
) -> torch.Tensor:
    _out_shape(x, weight, padding)
    _check_winograd(weight, padding, winograd_weight)
    if winograd_weight is not None:  # the top-down sum formed in the Winograd gather, never written
        b = None if bias is None else bias.to(x.dtype)
        return conv3x3_winograd(x, winograd_weight.to(x.dtype), b, relu, low=low)
    if low is not None:
        x = topdown_add_torch(x, low)
    if gemm_possible(x, weight) and (gemm_by_default(x, weight) if gemm is None else gemm):
        # the layout the fake promises: only an input that is contiguous too (Cin = 1 or H = W = 1) copies
        return _conv1x1_gemm(x, weight, bias, relu).contiguous(memory_format=out_memory_format(x))
    if (relu or onednn_weight is not None) and _relu_post_op_possible(x):
        bias = None if bias is None else bias.to(x.dtype)
        p, one = [padding, padding], [1, 1]
        w = weight.to(x.dtype) if onednn_weight is None else onednn_weight
        y = _CONV_POINTWISE(x, w, bias, p, one, one, 1, "relu" if relu else "none", [], "")
        return y.contiguous(memory_format=torch.channels_last)
    y = F.conv2d(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype), padding=padding)
    if relu:
        y = y.relu_()
    return y.contiguous(memory_format=out_memory_format(x))


def _conv_bn_relu_triton_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    padding: int,
    relu: bool,
    winograd_weight: torch.Tensor | None = None,
    gemm: bool | None = None,
    onednn_weight: torch.Tensor | None = None,
    low: torch.Tensor | None = None,
) -> torch.Tensor:
    if winograd_weight is not None:
        raise ValueError("conv_bn_relu: the Triton path computes convs directly; pass winograd_weight=None")
    if low is not None:
        x = topdown_add_triton(x, low)
    return conv_bn_relu_triton(x, weight, bias, padding, relu)


def _fake(backend: str):
    def fake(x, weight, bias, padding, relu, winograd_weight=None, gemm=None, onednn_weight=None, low=None):
        shape = _out_shape(x, weight, padding)
        _check_winograd(weight, padding, winograd_weight)
        fmt = out_memory_format(x) if backend == "triton" else _torch_out_format(x, winograd_weight)
        return torch.empty(shape, device=x.device, dtype=x.dtype, memory_format=fmt)

    return fake


CONV_BN_RELU = register_ops(
    "conv_bn_relu",
    {"torch": conv_bn_relu_torch, "triton": _conv_bn_relu_triton_op},
    {"torch": _fake("torch"), "triton": _fake("triton")},
)


def conv_bn_relu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    padding: int,
    relu: bool,
    winograd_weight: torch.Tensor | None = None,
    gemm: bool | None = None,
    onednn_weight: torch.Tensor | None = None,
    low: torch.Tensor | None = None,
    *,
    backend: str = "torch",
) -> torch.Tensor:
    """``relu?(conv2d(x, weight, bias, stride=1, padding))`` for 1x1/3x3 kernels; ``backend`` is
    ``"torch"`` or ``"triton"`` (choose it with ``upernet_fast.dispatch``). With ``winograd_weight``
    (``winograd.winograd_weight(weight, tile)``) the PyTorch path computes the 3x3 conv by Winograd
    F(tile x tile, 3x3). ``gemm``: run a 1x1 conv on channels-last input as one GEMM (True), on oneDNN
    (False), or as ``gemm_by_default`` says (None); the Triton path ignores it. ``onednn_weight``: ``weight``
    from ``_common.onednn_prepacked`` for the PyTorch path's oneDNN conv (see ``onednn_weight_useful``).
    ``low``: convolve ``x + resize_bilinear(low, x's size)`` instead (UPerNet's top-down sum; formed inside
    the Winograd transform where that runs, else first, as ``topdown_add``)."""
    check_low(x, low, "conv_bn_relu")
    return CONV_BN_RELU[backend](x, weight, bias, padding, relu, winograd_weight, gemm, onednn_weight, low)
