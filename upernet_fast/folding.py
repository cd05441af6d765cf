"""Inference-time weights derived from parameters (BatchNorm folded into convs, LayerNorm affine and
layer scale folded into Linear layers), cached and rebuilt whenever a source tensor changes.

The module keeps the checkpoint's own parameters, so `state_dict()` stays exactly the transformers layout;
the folded copies live beside them. The cache key is each source's storage pointer and in-place version
counter, so `load_state_dict`, `.to()`, `.half()` and in-place edits all invalidate it.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

import torch

T = TypeVar("T")


def version(t: torch.Tensor) -> int:
    """`t`'s in-place version counter; -1 for an inference tensor (made under `torch.inference_mode()`, e.g. a
    model built there by hand; `load` makes normal tensors), which has none. Such a tensor can only be
    edited in place inside inference mode, where nothing can see it: the one change this cache then misses
    (`load_state_dict` replaces it)."""
    if t.is_inference():
        return -1
    try:
        return t._version
    except RuntimeError:  # a Parameter made in inference mode whose .data a cast outside it replaced
        return -1


def _key(sources: Sequence[torch.Tensor | None]) -> tuple:
    return tuple(
        None if t is None else (t.data_ptr(), version(t), t.dtype, t.device, tuple(t.shape)) for t in sources
    )


# Entries kept per owner, least recently used dropped first. A module holds a few per input dtype, plus
# a few per input size for the size-dependent ones (oneDNN weights prepacked for an input shape, the head's
# low-resolution taps): without a bound, inputs of ever new sizes (keep-ratio resizing of a photo folder)
# grew memory by ~32 MB per size with a 512-channel head.
MAX_ENTRIES = 24
_ORDER = "_cached_order"  # slot -> None, least recently used first


def cached(owner: object, name: str, sources: Sequence[torch.Tensor | None], build: Callable[[], T]) -> T:
    """Return `build()`, memoised on `owner` under `name` until any of `sources` changes (at most
    `MAX_ENTRIES` per owner, least recently used dropped)."""
    slot = f"_folded_{name}"
    entry = owner.__dict__.get(slot)
    if torch.compiler.is_compiling():
        # Inside a compiled graph the eager cache is a constant; building here would trace the fold.
        return entry[1] if entry is not None else build()
    order = owner.__dict__.setdefault(_ORDER, OrderedDict())
    key = _key(sources)
    if entry is None or entry[0] != key:
        with torch.no_grad():
            value = build()
        owner.__dict__[slot] = (key, value)
        order[slot] = None
        order.move_to_end(slot)
        while len(order) > MAX_ENTRIES:
            owner.__dict__.pop(order.popitem(last=False)[0], None)
        return value
    if slot in order:
        order.move_to_end(slot)
    return entry[1]


def clear_cached(module: torch.nn.Module) -> None:
    """Drop every memoised derived weight of `module` and its submodules (rebuilt on next use): needed
    after edits the version counters cannot see (through `.data`), and before a compiled model is used
    with new weights (compiled graphs take these as constants)."""
    for m in module.modules():
        for slot in [k for k in m.__dict__ if k.startswith("_folded_") or k == _ORDER]:
            del m.__dict__[slot]
        cache = m.__dict__.get("_cache")
        if isinstance(cache, dict):
            m._cache = {}


# Full-precision originals of tensors that a cast to a less precise dtype replaced (a float32 checkpoint
# loaded as bfloat16: `FastUperNet._apply`), by id of the cast tensor: (weak ref to it, its data pointer and
# version at the cast, the original). The folds read their sources through `precise`, so a bf16 model's
# folded weights are rounded once from the checkpoint's values, not again from its rounded parameters:
# folding the rounded parameters instead cost ConvNeXt-T 0.1-0.5% argmax agreement
# with float32 (bench/results/decisions.md, "bf16 folds from the float32 originals"). Kept while the cast
# tensor is unchanged, so the folds come out the same whenever they are rebuilt.
_PRECISE: dict[int, tuple[weakref.ref, int, int, torch.Tensor]] = {}
_MANTISSA_BITS = {torch.float64: 52, torch.float32: 23, torch.float16: 10, torch.bfloat16: 7}


def more_precise(original: torch.dtype, cast: torch.dtype) -> bool:
    """Whether a cast from ``original`` to ``cast`` loses mantissa bits (float64 -> float32 -> fp16/bf16)."""
    return _MANTISSA_BITS.get(original, 0) > _MANTISSA_BITS.get(cast, 99)


def remember_precise(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> list[int]:
    """Record each (cast tensor, its more precise original) for ``precise``; returns the keys to
    ``forget_precise`` with. An entry also goes when its cast tensor is freed. Not for inference tensors
    (made under ``torch.inference_mode()``): they have no version counter, so an edit could not be seen."""
    keys = []
    for cast, original in pairs:
        if version(cast) < 0:
            continue
        key = id(cast)
        _PRECISE[key] = (weakref.ref(cast), cast.data_ptr(), version(cast), original.detach())
        weakref.finalize(cast, _PRECISE.pop, key, None)
        keys.append(key)
    return keys


def originals(keys: Iterable[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(cast tensor, original) of each still valid entry among ``keys``."""
    pairs = []
    for key in keys:
        entry = _PRECISE.get(key)
        t = None if entry is None else entry[0]()
        if t is not None and precise(t) is entry[3]:
            pairs.append((t, entry[3]))
    return pairs


def forget_precise(keys: Iterable[int]) -> None:
    for key in keys:
        _PRECISE.pop(key, None)


def precise(t: T) -> T:
    """``t``'s full-precision original while ``t`` is unchanged since the cast that made it (same storage,
    no in-place edit), else ``t`` itself (also while tracing: a compiled graph folds the parameters)."""
    # is_compiling first: dynamo must not read _PRECISE (it would guard on entries a finalizer may drop)
    if torch.compiler.is_compiling() or not _PRECISE or not isinstance(t, torch.Tensor):
        return t
    entry = _PRECISE.get(id(t))
    if entry is None or entry[0]() is not t or entry[1] != t.data_ptr() or entry[2] != version(t):
        return t
    return entry[3]


def fold_batchnorm_tensors(
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    bn_weight: torch.Tensor,
    bn_bias: torch.Tensor,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    eps: float,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """conv → BN(eval) as one conv: W' = W·γ/σ, b' = (b − μ)·γ/σ + β with σ = sqrt(var + eps), computed in
    float64 and cast to `dtype` (default: the conv weight's) with one rounding."""
    dtype = dtype or conv_weight.dtype
    conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var = (
        precise(t) for t in (conv_weight, conv_bias, bn_weight, bn_bias, running_mean, running_var)
    )
    w = conv_weight.detach().double()
    scale = bn_weight.detach().double() / torch.sqrt(running_var.detach().double() + eps)
    bias = conv_bias.detach().double() if conv_bias is not None else torch.zeros_like(scale)
    w_folded = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
    b_folded = (bias - running_mean.detach().double()) * scale + bn_bias.detach().double()
    return w_folded.to(dtype).contiguous(), b_folded.to(dtype).contiguous()


def fold_batchnorm(
    conv_weight: torch.Tensor,
    conv_bias: torch.Tensor | None,
    bn: torch.nn.BatchNorm2d,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``fold_batchnorm_tensors`` with the statistics and affine of ``bn``."""
    return fold_batchnorm_tensors(
        conv_weight, conv_bias, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps, dtype
    )
