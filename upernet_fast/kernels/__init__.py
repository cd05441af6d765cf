"""Kernel layer: one file per fused op, each with a Triton kernel, its launcher, a PyTorch path and a
``torch.library`` registration (``torch.ops.upernet_fast.<op>``). No model knowledge lives here: nothing
in this package imports from the rest of ``upernet_fast``; which implementation runs is decided by
``upernet_fast.dispatch`` (the functions below take ``backend="torch"|"triton"``; each backend is its own registered op, ``torch.ops.upernet_fast.<op>_<backend>``, so nothing branches inside an op)."""

from ._common import HAS_TRITON
from .conv_bn_relu import conv_bn_relu
from .fpn import conv3x3_taps_weight, topdown_add, upsample_shift_add, upsample_shift_add_sum
from .ppm import adaptive_pool_multi
from .resize import resize_argmax, resize_bilinear

__all__ = [
    "HAS_TRITON",
    "adaptive_pool_multi",
    "conv3x3_taps_weight",
    "conv_bn_relu",
    "resize_argmax",
    "resize_bilinear",
    "topdown_add",
    "upsample_shift_add",
    "upsample_shift_add_sum",
]
