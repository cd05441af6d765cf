"""Kernel layer: one file per fused op, each with a Triton kernel, its launcher, a PyTorch path and a
``torch.library`` registration (``torch.ops.upernet_fast.<op>``). No model knowledge lives here; which
backend runs is decided by ``upernet_fast.dispatch`` (the functions below take ``backend="torch"|"triton"``).

This folder is installed as ``upernet_fast.kernels``. From a repository checkout it can also be found as a
top-level ``kernels`` (the checkout on ``sys.path``), and transformers imports ``kernels`` to probe for
Hugging Face's package of that name: under any other name it defines nothing, so the ops are never
registered twice and the probe finds no usable ``kernels`` (no ``__version__``)."""

if __name__ == "upernet_fast.kernels":
    from ._common import HAS_TRITON
    from .conv_bn_relu import conv_bn_relu, fold_batchnorm
    from .fpn import conv3x3_taps_weight, topdown_add, upsample_shift_add
    from .ppm import adaptive_pool_multi
    from .resize import resize_argmax, resize_bilinear

    __all__ = [
        "HAS_TRITON",
        "adaptive_pool_multi",
        "conv3x3_taps_weight",
        "conv_bn_relu",
        "fold_batchnorm",
        "resize_argmax",
        "resize_bilinear",
        "topdown_add",
        "upsample_shift_add",
    ]
else:
    __all__ = []
