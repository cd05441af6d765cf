"""Native Swin backbone: same outputs and checkpoint keys as transformers' `SwinBackbone` (5.x).

Reference semantics (what `SwinBackbone.forward` does, which differs from plain `SwinModel`):
- patch embedding pads the image on the right/bottom to a multiple of the patch size; `embeddings.norm`,
  `downsample.norm` and `hidden_states_norms` use LayerNorm's default eps 1e-5, only the block norms use
  `layer_norm_eps`;
- the backbone calls the encoder with `always_partition=True`, so window/shift sizes are NEVER clamped to
  the resolution: a 4x5 map is padded to one 7x7 window and the odd blocks still shift by ws//2 with the
  -100 mask. Padded tokens (zeros after `layernorm_before`) are attended to, not masked;
- patch merging pads odd sizes with zeros and concatenates [0::2,0::2],[1::2,0::2],[0::2,1::2],[1::2,1::2];
- feature maps are the stage outputs BEFORE downsampling, through `hidden_states_norms[stage]`, (B,C,H,W);
- `hidden_states` = (embedding output, each stage's pre-downsampling output), all (B,C,H,W), un-normed;
- `attentions` = one tensor per stage: the LAST block's softmax weights, (B*num_windows, heads, ws², ws²).

Inference fast path (no autograd, no attention weights asked for; exact up to float rounding). Swin-T,
512x683, batch 1, 1 thread: ~1.45x transformers' SwinBackbone (GEMMs are ~80% of what is left).
- activations stay (B*H*W, C) row-major; the LayerNorm affines of `layernorm_before` / `layernorm_after` /
  `downsample.norm` and the query scaling are folded (float64) into one fused qkv Linear, `intermediate.dense`
  and `reduction`, cached beside the parameters (`folding.cached`: rebuilt when any source changes);
- padding, the cyclic shift and the window partition are one row gather (indices cached per size); the
  inverse gather also un-shifts and crops, so `attention.output.dense` runs on real tokens only. With little
  padding (early stages) the C-wide input is gathered, in chunks of windows; with much padding (late
  stages) the 3C-wide qkv of the real tokens. Padded rows get the qkv bias (what a zero token gives);
- attention is `scaled_dot_product_attention` on strided q/k/v views with the cached bias (+ shift mask):
  as fast as an explicit baddbmm/softmax/bmm at ws=7, and that one needs contiguous copies;
- the Linears go through `fused_linear`: on CPU fp32, oneDNN (prepacked weights, GELU fused) for the
  narrow stage-1 layers, MKL's sgemm for the rest (whichever measured faster, table there); the MLP (with
  its LayerNorm) runs in row chunks so its 4C hidden stays in cache, and adds into the residual in place;
- feature maps / hidden states are returned as NCHW views of channels-last memory (no copies).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..dispatch import linear_bf16x3_choice, mlp_bf16x3_decided, note_mlp_bf16x3
from ..folding import cached, precise, version
from ..kernels.gemm_bf16x3 import mlp_bf16x3_, pack_weight
from .base import Backbone, BackboneOutput, eager_inference
from .fused_linear import FUSED_ACT, LinearWeights, linear, linear_plan, mlp_rows_, normalize, plain_weights

if TYPE_CHECKING:
    from ..dispatch import Plan

# transformers' SwinConfig defaults (the fields that matter at inference).
SWIN_DEFAULTS: dict[str, Any] = {
    "image_size": 224,
    "patch_size": 4,
    "num_channels": 3,
    "embed_dim": 96,
    "depths": [2, 2, 6, 2],
    "num_heads": [3, 6, 12, 24],
    "window_size": 7,
    "mlp_ratio": 4.0,
    "qkv_bias": True,
    "hidden_act": "gelu",
    "use_absolute_embeddings": False,
    "layer_norm_eps": 1e-5,
}

_ACT = {
    "gelu": nn.GELU,
    "gelu_pytorch_tanh": functools.partial(nn.GELU, approximate="tanh"),
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
}

# transformers 5 in-memory names -> on-disk names (applied after stripping `swin.`).
_INMEMORY_RENAMES = (
    ("attention.q_proj.", "attention.self.query."),
    ("attention.k_proj.", "attention.self.key."),
    ("attention.v_proj.", "attention.self.value."),
    (
        "attention.relative_position_bias.relative_position_bias_table",
        "attention.self.relative_position_bias_table",
    ),
    ("attention.o_proj.", "attention.output.dense."),
    ("mlp.fc1.", "intermediate.dense."),
    ("mlp.fc2.", "output.dense."),
)
_CACHE_SIZE = 4  # (input size, dtype, device) entries kept per block
_PAD_GATHER_FIRST = 1.1  # window rows / token rows below which the input, not qkv, is partitioned
_ATTN_CHUNK_ROWS = 4096  # window rows per attention chunk when the input is partitioned first


class Split(NamedTuple):
    """Which of a Swin stage's GEMMs run as bf16x3 (split bfloat16 on AMX), as ``dispatch`` decided: the
    block MLP (``mlp_bf16x3_``), the fused qkv Linear and the attention output Linear (``linear``)."""

    mlp: bool = False
    qkv: bool = False
    proj: bool = False


FLOAT32 = Split()  # every GEMM in float32


def _pair(v: int | list[int] | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


@functools.lru_cache(maxsize=32)
def _shift_mask(hp: int, wp: int, ws: int, shift: int, device: torch.device) -> torch.Tensor:
    """(num_windows, ws², ws²) float32 mask, 0 within a cyclic-shift region and -100 across regions."""
    hr = (torch.arange(hp, device=device) >= hp - ws).long() + (
        torch.arange(hp, device=device) >= hp - shift
    ).long()
    wr = (torch.arange(wp, device=device) >= wp - ws).long() + (
        torch.arange(wp, device=device) >= wp - shift
    ).long()
    region = (
        (hr[:, None] * 3 + wr[None, :]).view(hp // ws, ws, wp // ws, ws).transpose(1, 2).reshape(-1, ws * ws)
    )
    return torch.where(region[:, None, :] != region[:, :, None], -100.0, 0.0).float()


def _relative_position_index(ws: int) -> torch.Tensor:
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)
    return (rel[..., 0] * (2 * ws - 1) + rel[..., 1]).view(-1)


@functools.lru_cache(maxsize=64)
def _window_index(
    b: int, h: int, w: int, ws: int, shift: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Row indices for pad + roll(-shift) + window partition of a (B*H*W, ·) token matrix, as one gather.

    Returns `gather` (B*nW*ws², into token rows; padded positions point at row 0), `pad` (window rows that
    are padding, or None) and `scatter` (B*H*W, into window rows: un-partition + roll back + crop)."""
    hp, wp = h + (-h) % ws, w + (-w) % ws
    nh, nw, n = hp // ws, wp // ws, ws * ws
    rows = ((torch.arange(hp) + shift) % hp).view(nh, 1, ws, 1).expand(nh, nw, ws, ws)
    cols = ((torch.arange(wp) + shift) % wp).view(1, nw, 1, ws).expand(nh, nw, ws, ws)
    valid = ((rows < h) & (cols < w)).reshape(-1)
    src = torch.where(valid, (rows * w + cols).reshape(-1), 0)
    gather = (src[None] + h * w * torch.arange(b)[:, None]).reshape(-1)
    pad = None
    if not bool(valid.all()):
        pad = ((~valid).nonzero()[:, 0][None] + nh * nw * n * torch.arange(b)[:, None]).reshape(-1)
    ry, rx = (torch.arange(h) - shift) % hp, (torch.arange(w) - shift) % wp
    pos = (
        ((ry // ws) * nw)[:, None] * n + (rx // ws)[None, :] * n + ((ry % ws) * ws)[:, None] + (rx % ws)[None]
    )
    scatter = (pos.reshape(-1)[None] + nh * nw * n * torch.arange(b)[:, None]).reshape(-1)
    to = functools.partial(torch.Tensor.to, device=device)
    return to(gather), None if pad is None else to(pad), to(scatter)


@functools.lru_cache(maxsize=64)
def _window_chunks(
    b: int, h: int, w: int, ws: int, shift: int, chunk: int, device: torch.device
) -> tuple[tuple[int, int, int, torch.Tensor | None], ...]:
    """Runs of at most `chunk` windows of `_window_index`'s order, never across images: (first window,
    end window, first window within its image, padded rows relative to the run or None)."""
    hp, wp = h + (-h) % ws, w + (-w) % ws
    per, n = (hp // ws) * (wp // ws), ws * ws
    pad = _window_index(b, h, w, ws, shift, torch.device("cpu"))[1]
    is_pad = torch.zeros(b * per * n, dtype=torch.bool)
    if pad is not None:
        is_pad[pad] = True
    runs = []
    for i in range(b):
        for s in range(0, per, chunk):
            w0, w1 = i * per + s, i * per + min(per, s + chunk)
            local = is_pad[w0 * n : w1 * n].nonzero()[:, 0]
            runs.append((w0, w1, s, local.to(device) if len(local) else None))
    return tuple(runs)


def _fold_ln_into_linear(
    ln: nn.LayerNorm,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear(LN(x)) = Linear'(LN₀(x)) with LN₀ affine-free: W' = s·W·diag(γ), b' = s·(W·β + b) (float64,
    from the parameters' full-precision originals where a cast kept them: `folding.precise`), in `dtype`
    (default the weight's). `scale` (per output row) multiplies both."""
    dtype = dtype or weight.dtype
    w = precise(weight).detach().double()
    b = (
        torch.zeros(w.shape[0], dtype=torch.float64, device=w.device)
        if bias is None
        else precise(bias).detach().double()
    )
    if ln.bias is not None:
        b = b + w @ precise(ln.bias).detach().double()
    if ln.weight is not None:
        w = w * precise(ln.weight).detach().double()
    if scale is not None:
        w, b = w * scale[:, None], b * scale
    return w.to(dtype).contiguous(), b.to(dtype).contiguous()


class SwinPatchEmbeddings(nn.Module):
    def __init__(self, patch_size: tuple[int, int], num_channels: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.projection = nn.Conv2d(num_channels, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, pixel_values: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        h, w = pixel_values.shape[-2:]
        ph, pw = self.patch_size
        pixel_values = F.pad(pixel_values, (0, (-w) % pw, 0, (-h) % ph))
        if channels_last:  # output in (B, H, W, C) memory: the permute below is free (decisions.md)
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        return self.projection(pixel_values)


class SwinEmbeddings(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        patch, image = _pair(cfg["patch_size"]), _pair(cfg["image_size"])
        self.patch_embeddings = SwinPatchEmbeddings(patch, cfg["num_channels"], cfg["embed_dim"])
        num_patches = (image[0] // patch[0]) * (image[1] // patch[1])
        self.position_embeddings = (
            nn.Parameter(torch.zeros(1, num_patches, cfg["embed_dim"]))
            if cfg["use_absolute_embeddings"]
            else None
        )
        self.norm = nn.LayerNorm(
            cfg["embed_dim"]
        )  # eps 1e-5 regardless of layer_norm_eps, as in transformers

    def forward(self, pixel_values: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
        x = self.norm(self.patch_embeddings(pixel_values, channels_last).permute(0, 2, 3, 1))  # (B, H, W, C)
        if self.position_embeddings is not None:
            # transformers adds the table without interpolation: only the config's image_size works.
            b, h, w, c = x.shape
            if self.position_embeddings.shape[1] != h * w:
                raise ValueError(
                    f"absolute position embeddings cover {self.position_embeddings.shape[1]} patches, "
                    f"input has {h}x{w}"
                )
            x = x + self.position_embeddings.view(1, h, w, c)
        return x


class _SelfAttention(nn.Module):
    """Holds the on-disk parameter names `attention.self.{query,key,value,relative_position_bias_table}`."""

    def __init__(self, dim: int, num_heads: int, ws: int, qkv_bias: bool) -> None:
        super().__init__()
        self.query = nn.Linear(dim, dim, bias=qkv_bias)
        self.key = nn.Linear(dim, dim, bias=qkv_bias)
        self.value = nn.Linear(dim, dim, bias=qkv_bias)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * ws - 1) ** 2, num_heads))
        self.register_buffer("relative_position_index", _relative_position_index(ws), persistent=False)


class _Dense(nn.Module):
    """`attention.output.dense`, `intermediate.dense`, `output.dense`."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)


class _Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, ws: int, qkv_bias: bool) -> None:
        super().__init__()
        self.self = _SelfAttention(dim, num_heads, ws, qkv_bias)
        self.output = _Dense(dim, dim)


class SwinLayer(nn.Module):
    def __init__(self, cfg: dict[str, Any], dim: int, num_heads: int, shift: int) -> None:
        super().__init__()
        ws = cfg["window_size"]
        self.window_size, self.shift_size, self.num_heads = ws, shift, num_heads
        self.attention = _Attention(dim, num_heads, ws, cfg["qkv_bias"])
        self.layernorm_before = nn.LayerNorm(dim, eps=cfg["layer_norm_eps"])
        self.layernorm_after = nn.LayerNorm(dim, eps=cfg["layer_norm_eps"])
        hidden = int(cfg["mlp_ratio"] * dim)
        self.intermediate = _Dense(dim, hidden)
        self.output = _Dense(hidden, dim)
        self.act = _ACT[cfg["hidden_act"]]()
        self._fused_act = FUSED_ACT.get(cfg["hidden_act"])
        self._cache: dict[tuple, torch.Tensor] = {}  # replaced, never mutated: safe to read from any thread

    def _bias_mask(self, hp: int, wp: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Relative position bias (+ shift mask): (1, heads, N, N) or (num_windows, heads, N, N)."""
        table = self.attention.self.relative_position_bias_table
        # Cache only when no autograd graph can need it; the version changes on every in-place load/copy_.
        cacheable = eager_inference()
        if cacheable:  # (not traced: dynamo refuses is_inference and data_ptr)
            key = (hp, wp, dtype, device, version(table), table.data_ptr())
            if (hit := self._cache.get(key)) is not None:
                return hit
        n = self.window_size**2
        bias = table[self.attention.self.relative_position_index].view(n, n, -1).permute(2, 0, 1)[None]
        if self.shift_size > 0:
            bias = bias + _shift_mask(hp, wp, self.window_size, self.shift_size, device)[:, None]
        bias = bias.to(dtype).contiguous()
        if cacheable:
            keep = [(k, v) for k, v in self._cache.items() if k[4:] == key[4:]][-(_CACHE_SIZE - 1) :]
            self._cache = dict(keep) | {key: bias}
        return bias

    def _attend(self, x: torch.Tensor, bias: torch.Tensor, need_weights: bool):
        """x: (B, nW, N, C) windows -> (B, nW, N, C), attention weights or None."""
        b, nw, n, c = x.shape
        heads, s = self.num_heads, self.attention.self
        w = torch.cat([s.query.weight, s.key.weight, s.value.weight])
        bqkv = None if s.query.bias is None else torch.cat([s.query.bias, s.key.bias, s.value.bias])
        qkv = F.linear(x, w, bqkv).view(b, nw, n, 3, heads, c // heads).permute(3, 0, 1, 4, 2, 5).contiguous()
        q, k, v = qkv.unbind(0)  # (B, nW, heads, N, d)
        if need_weights:  # transformers' eager path: scores * scale + mask, softmax in float32
            scores = (q @ k.transpose(-1, -2)) * (c // heads) ** -0.5 + bias
            probs = scores.softmax(-1, dtype=torch.float32).to(q.dtype)
            out = probs @ v
            weights = probs.reshape(b * nw, heads, n, n)
        else:
            # A shared bias broadcasts over (B*nW); a per-window one over B after merging windows into heads.
            lead = (b * nw, heads) if bias.shape[0] == 1 else (b, nw * heads)
            out = F.scaled_dot_product_attention(
                q.reshape(*lead, n, -1),
                k.reshape(*lead, n, -1),
                v.reshape(*lead, n, -1),
                attn_mask=bias.view(1, lead[1], n, n),
            ).view(b, nw, heads, n, -1)
            weights = None
        out = out.transpose(2, 3).reshape(b, nw, n, c)
        return self.attention.output.dense(out), weights

    def forward(self, x: torch.Tensor, need_weights: bool = False):
        """x: (B, H, W, C)."""
        b, h, w, c = x.shape
        ws, shift = self.window_size, self.shift_size
        y = F.pad(self.layernorm_before(x), (0, 0, 0, (-w) % ws, 0, (-h) % ws))
        hp, wp = y.shape[1:3]
        if shift:
            y = torch.roll(y, (-shift, -shift), (1, 2))
        y = y.view(b, hp // ws, ws, wp // ws, ws, c).transpose(2, 3).reshape(b, -1, ws * ws, c)
        y, weights = self._attend(y, self._bias_mask(hp, wp, x.dtype, x.device), need_weights)
        y = y.view(b, hp // ws, wp // ws, ws, ws, c).transpose(2, 3).reshape(b, hp, wp, c)
        if shift:
            y = torch.roll(y, (shift, shift), (1, 2))
        x = x + y[:, :h, :w]
        x = x + self.output.dense(self.act(self.intermediate.dense(self.layernorm_after(x))))
        return x, weights

    # ---- inference fast path -------------------------------------------------------------------------

    def _qkv_weights(self) -> tuple[LinearWeights, torch.Tensor]:
        """Fused qkv Linear over the affine-free `layernorm_before`, query scaling folded in; plus the qkv
        row of a padded (all-zero after the norm) token, i.e. the scaled qkv bias."""
        s, ln = self.attention.self, self.layernorm_before
        parts = (s.query, s.key, s.value)
        sources = [p.weight for p in parts] + [p.bias for p in parts] + [ln.weight, ln.bias]

        def build():
            w = torch.cat([precise(p.weight) for p in parts])
            b = None if s.query.bias is None else torch.cat([precise(p.bias) for p in parts])
            dim = w.shape[1]
            scale = torch.ones(w.shape[0], dtype=torch.float64, device=w.device)
            scale[:dim] = (dim // self.num_heads) ** -0.5
            wf, bf = _fold_ln_into_linear(ln, w, b, scale, s.query.weight.dtype)
            pad = torch.zeros_like(bf) if b is None else (b.double() * scale).to(bf.dtype)
            return LinearWeights(wf, bf), pad

        return cached(self, "qkv", sources, build)

    def _fc1_weights(self) -> LinearWeights:
        ln, fc1 = self.layernorm_after, self.intermediate.dense
        return cached(
            self,
            "fc1",
            [ln.weight, ln.bias, fc1.weight, fc1.bias],
            lambda: LinearWeights(*_fold_ln_into_linear(ln, fc1.weight, fc1.bias)),
        )

    def _mlp_packed_bf16x3(self) -> tuple[torch.Tensor, torch.Tensor]:
        """fc1 (LayerNorm affine folded in) and fc2 as ``mlp_bf16x3_`` takes them, keyed by the module's own
        parameters (the folds are inference tensors when built under inference_mode)."""
        ln, fc1, fc2 = self.layernorm_after, self.intermediate.dense, self.output.dense
        sources = [ln.weight, ln.bias, fc1.weight, fc1.bias, fc2.weight, fc2.bias]
        build = lambda: (pack_weight(self._fc1_weights().weight), pack_weight(fc2.weight))  # noqa: E731
        return cached(self, "mlp_bf16x3", sources, build)

    def _mlp_(self, x: torch.Tensor, bf16x3: bool = False) -> None:
        """x (T, C) += MLP(layernorm_after(x)), in place, in row chunks (the 4C hidden stays in cache);
        ``bf16x3``: as split-bfloat16 GEMMs in C (``kernels/gemm_bf16x3.py``; the same block MLP as
        ConvNeXt's, with the residual as the LayerNorm's input)."""
        fc1, fc2 = self._fc1_weights(), self._fc2_weights()
        if bf16x3:
            p1, p2 = self._mlp_packed_bf16x3()
            rows = x.view(1, 1, *x.shape).permute(0, 3, 1, 2)  # (1, C, 1, T): the rows as a channels-last map
            b2 = fc2.bias if fc2.bias is not None else x.new_zeros(x.shape[1])
            mlp_bf16x3_(rows, rows, p1, fc1.bias, p2, b2, self.layernorm_after.eps)
            return
        mlp_rows_(x, x, fc1, fc2, self.layernorm_after.eps, self._fused_act, self.act)

    def forward_fast(self, x: torch.Tensor, split: Split = FLOAT32) -> torch.Tensor:
        """Inference only (no autograd, no attention weights). x: (B, H, W, C) -> (B, H, W, C)."""
        b, h, w, c = x.shape
        ws, heads = self.window_size, self.num_heads
        hp, wp = h + (-h) % ws, w + (-w) % ws
        n, windows = ws * ws, b * (hp // ws) * (wp // ws)
        tokens = x.reshape(-1, c)
        wqkv, pad_row = self._qkv_weights()
        pad_row = pad_row.to(x.dtype)
        eps = self.layernorm_before.eps
        gather, pad, scatter = _window_index(b, h, w, ws, self.shift_size, x.device)
        mask = self._bias_mask(hp, wp, x.dtype, x.device)  # (1 or nW, heads, n, n)
        per_image = windows // b

        def attend(qkv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # -> (windows, n, heads, d)
            q, k, v = qkv.view(-1, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=1.0).transpose(1, 2)

        if windows * n <= _PAD_GATHER_FIRST * tokens.shape[0]:
            # Little padding (early stages, many tokens): partition the C-wide input rather than the 3C-wide
            # qkv (the padded rows' Linear output is wasted, then overwritten), in chunks of windows so no
            # large qkv tensor is ever allocated (fresh multi-MB allocations page-fault on every call).
            out = x.new_empty(windows, n, heads, c // heads)
            chunk = max(_ATTN_CHUNK_ROWS // n, 1)
            for w0, w1, m0, pad_local in _window_chunks(b, h, w, ws, self.shift_size, chunk, x.device):
                qkv = linear(
                    normalize(tokens.index_select(0, gather[w0 * n : w1 * n]), eps), wqkv, None, split.qkv
                )
                if pad_local is not None:  # transformers pads after the affine norm: a zero token's qkv
                    qkv[pad_local] = pad_row  # is the bias
                out[w0:w1] = attend(qkv, mask if mask.shape[0] == 1 else mask[m0 : m0 + w1 - w0])
        else:  # much padding (late stages, few tokens): no Linear on padded rows
            qkv = linear(normalize(tokens, eps), wqkv, None, split.qkv).index_select(0, gather)
            if pad is not None:
                qkv[pad] = pad_row
            if mask.shape[0] == 1 or b == 1:
                out = attend(qkv, mask)
            else:  # a per-window mask cannot broadcast over the batch without a copy: one call per image
                out = x.new_empty(windows, n, heads, c // heads)
                for i in range(b):
                    sl = slice(i * per_image, (i + 1) * per_image)
                    out[sl] = attend(qkv[sl.start * n : sl.stop * n], mask)
        out = out.reshape(-1, c).index_select(0, scatter)  # un-partition + roll back + crop: (B*H*W, C)
        x = linear(out, self._proj_weights(), None, split.proj).add_(tokens)
        self._mlp_(x, split.mlp)
        return x.view(b, h, w, c)

    def _proj_weights(self) -> LinearWeights:
        return plain_weights(self, "proj", self.attention.output.dense)

    def _fc2_weights(self) -> LinearWeights:
        return plain_weights(self, "fc2", self.output.dense)

    def linears(self) -> list[tuple[str, LinearWeights, bool]]:
        """(on-disk name, weights, followed by the activation) of each Linear `forward_fast` runs."""
        return [
            ("attention.self.query/key/value (one fused Linear)", self._qkv_weights()[0], False),
            ("attention.output.dense", self._proj_weights(), False),
            ("intermediate.dense", self._fc1_weights(), True),
            ("output.dense", self._fc2_weights(), False),
        ]


class SwinPatchMerging(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)  # default eps, as in transformers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        # channel groups in transformers' order: (row, col) = (0,0), (1,0), (0,1), (1,1)
        x = (
            x.view(b, (h + 1) // 2, 2, (w + 1) // 2, 2, c)
            .permute(0, 1, 3, 4, 2, 5)
            .reshape(b, (h + 1) // 2, -1, 4 * c)
        )
        return self.reduction(self.norm(x))

    def weights(self) -> LinearWeights:
        """`reduction` with `norm`'s affine folded in."""
        red = self.reduction
        return cached(
            self,
            "reduction",
            [self.norm.weight, self.norm.bias, red.weight, red.bias],
            lambda: LinearWeights(*_fold_ln_into_linear(self.norm, red.weight, red.bias)),
        )

    def forward_fast(self, x: torch.Tensor, bf16x3: bool = False) -> torch.Tensor:
        """Inference only; `norm`'s affine folded into `reduction` (as bf16x3 with ``bf16x3``).
        x: (B, H, W, C) -> (B, H', W', 2C)."""
        b, h, w, c = x.shape
        h2, w2 = (h + 1) // 2, (w + 1) // 2
        merged = x.new_empty(b, h2, w2, 4, c)
        for g, (r, col) in enumerate(((0, 0), (1, 0), (0, 1), (1, 1))):
            src = x[:, r::2, col::2]
            merged[:, : src.shape[1], : src.shape[2], g] = src
        if h % 2:  # zero padding of transformers' F.pad: last row of the odd-row groups
            merged[:, -1, :, 1::2] = 0
        if w % 2:
            merged[:, :, -1, 2:] = 0
        y = normalize(merged.view(-1, 4 * c), self.norm.eps)
        return linear(y, self.weights(), None, bf16x3).view(b, h2, w2, -1)


class SwinStage(nn.Module):
    def __init__(self, cfg: dict[str, Any], dim: int, depth: int, num_heads: int, downsample: bool) -> None:
        super().__init__()
        shift = cfg["window_size"] // 2
        self.blocks = nn.ModuleList(
            SwinLayer(cfg, dim, num_heads, 0 if i % 2 == 0 else shift) for i in range(depth)
        )
        self.downsample = SwinPatchMerging(dim) if downsample else None


class SwinEncoder(nn.Module):
    def __init__(self, cfg: dict[str, Any]) -> None:
        super().__init__()
        n = len(cfg["depths"])
        self.layers = nn.ModuleList(
            SwinStage(cfg, cfg["embed_dim"] * 2**i, cfg["depths"][i], cfg["num_heads"][i], i < n - 1)
            for i in range(n)
        )


class _OptionalLayerNorm(nn.LayerNorm):
    """transformers 5's unused final `swin.layernorm`: loaded when present, else left at ones/zeros without
    a missing-key error, since pre-5 hub files do not have it (transformers ignores it the same way).
    Loaded from a file without it, it also leaves `state_dict()`, which then lists exactly the file's keys."""

    in_checkpoint = True  # False once loaded from a checkpoint that lacks it

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        self.in_checkpoint = prefix + "weight" in state_dict or prefix + "bias" in state_dict
        if self.in_checkpoint:
            super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        if self.in_checkpoint:
            super()._save_to_state_dict(destination, prefix, keep_vars)


def _to_nchw(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) -> (B, C, H, W) view: NCHW shape, channels-last memory (no copy)."""
    return x.permute(0, 3, 1, 2)


class SwinBackbone(Backbone):
    """Drop-in for transformers' `SwinBackbone`; `config` is the raw `backbone_config` dict of an UperNet config."""

    # state_dict keys a checkpoint may lack (pre-transformers-5 hub files): the unused final norm.
    optional_keys = ("swin.layernorm.weight", "swin.layernorm.bias")

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        cfg = self._setup(
            config,
            SWIN_DEFAULTS,
            _ACT,
            lambda c: [c["embed_dim"]] + [c["embed_dim"] * 2**i for i in range(len(c["depths"]))],
            lambda c: [_pair(c["patch_size"])[0] * 2 ** max(i - 1, 0) for i in range(len(c["depths"]) + 1)],
            "Swin",
        )
        last = cfg["embed_dim"] * 2 ** (len(cfg["depths"]) - 1)

        self.embeddings = SwinEmbeddings(cfg)
        self.encoder = SwinEncoder(cfg)
        # Never applied (SwinBackbone ignores it too); kept so state_dict keys equal transformers 5's files.
        self.swin = nn.Module()
        self.swin.layernorm = _OptionalLayerNorm(last, eps=cfg["layer_norm_eps"])
        self.hidden_states_norms = nn.ModuleDict(
            {s: nn.LayerNorm(c) for s, c in zip(self.out_features, self.channels)}
        )

    def set_absent_optional_keys(self, keys: set[str]) -> None:
        """Loaded from a checkpoint without these `optional_keys`: leave them out of `state_dict()` too."""
        if keys & set(self.optional_keys):
            self.swin.layernorm.in_checkpoint = False

    @staticmethod
    def remap_state_dict(state_dict: dict[str, Any], prefix: str) -> dict[str, Any]:
        """Rename transformers 5's in-memory layout to the file layout; drop `relative_position_index`
        (pre-5 files stored it; it is derived from the window size). Values are never touched."""
        out = {}
        for key, value in state_dict.items():
            if not key.startswith(prefix):
                out[key] = value
                continue
            rest = key[len(prefix) :]
            if rest.startswith(("swin.embeddings.", "swin.encoder.")):
                rest = rest[len("swin.") :]
            if rest.endswith("relative_position_index"):
                continue
            for old, new in _INMEMORY_RENAMES:
                rest = rest.replace(old, new)
            out[prefix + rest] = value
        return out

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        plan: Plan | None = None,
    ) -> BackboneOutput:
        # Fast path whenever no autograd graph is recorded; blocks whose attention weights are returned
        # (the last of each stage) take transformers' explicit path. Under torch.compile the reference
        # path is traced instead (the fast path's cached indices/packed weights are eager-only; inductor
        # fuses and packs on its own).
        fast = eager_inference()
        noting = fast and plan is not None and not plan.frozen
        x = self.embeddings(pixel_values, channels_last=fast)
        hidden_states = [_to_nchw(x)] if output_hidden_states else None
        attentions = [] if output_attentions else None
        feature_maps = []
        if "stem" in self.out_features:
            feature_maps.append(_to_nchw(self.hidden_states_norms["stem"](x)))
        # Stages past the deepest selected one change no output unless all hidden states/attentions are wanted.
        last = len(self.encoder.layers) if (output_hidden_states or output_attentions) else self._deepest
        for i, stage in enumerate(self.encoder.layers[:last]):
            split, whys = self._split(plan, stage, x) if fast else (FLOAT32, {})
            if noting and stage.blocks:
                self._note_blocks(plan, stage, x, split, whys)
            weights = None
            for j, block in enumerate(stage.blocks):
                need = output_attentions and j == len(stage.blocks) - 1
                if fast and not need:
                    x = block.forward_fast(x, split)
                else:
                    x, weights = block(x, need_weights=need)
            name = f"stage{i + 1}"
            if name in self.hidden_states_norms:
                feature_maps.append(_to_nchw(self.hidden_states_norms[name](x)))
            if hidden_states is not None:
                hidden_states.append(_to_nchw(x))
            if attentions is not None:
                attentions.append(weights)
            if stage.downsample is not None and i + 1 < last:
                merge = self._merge_bf16x3(plan, stage.downsample, x) if fast else None
                if noting:
                    reduction = [("reduction", stage.downsample.weights(), False)]
                    self._note_linears(plan, stage.downsample, reduction, x, bf16x3={"reduction": merge})
                x = stage.downsample.forward_fast(x, merge[0]) if fast else stage.downsample(x)
        return BackboneOutput(
            feature_maps=tuple(feature_maps),
            hidden_states=tuple(hidden_states) if hidden_states is not None else None,
            attentions=tuple(attentions) if attentions is not None else None,
        )

    def _mlp_bf16x3(self, plan: Plan | None, stage: SwinStage, x: torch.Tensor) -> tuple[bool, str]:
        """(bf16x3?, why) for `stage`'s block MLPs on tokens like `x` (B, H, W, C), decided as ConvNeXt's
        (`dispatch.mlp_bf16x3_decided`): the same computation, and the same tuning entry, whose float32
        candidate (ConvNeXt's oneDNN MLP) measured faster than Swin's row-chunked Linears
        (bench/results/decisions.md, "ConvNeXt MLP as oneDNN 1x1 convs")."""
        if not stage.blocks:
            return False, ""
        hidden, act = stage.blocks[0].intermediate.dense.out_features, self.config["hidden_act"]
        return mlp_bf16x3_decided(plan, stage, x.permute(0, 3, 1, 2), hidden, act)  # (B, C, H, W) view

    def _split(self, plan: Plan | None, stage: SwinStage, x: torch.Tensor) -> tuple[Split, dict[str, tuple]]:
        """Which of `stage`'s block GEMMs run as bf16x3 on tokens like `x` (B, H, W, C), and the (choice, why)
        of each Linear kind by its on-disk name: the MLP as ConvNeXt's (`_mlp_bf16x3`), the qkv and output
        Linears by `dispatch.linear_bf16x3_choice`, each decided once per plan."""
        if not stage.blocks:
            return FLOAT32, {}
        mlp = self._mlp_bf16x3(plan, stage, x)
        b, h, w, c = x.shape

        def decide(name: str, out: int) -> tuple[bool, str]:
            choose = lambda: linear_bf16x3_choice(plan, x, (c, out), (b, h, w))  # noqa: E731
            return choose() if plan is None else plan.decide(stage, f"{name}-bf16x3", choose)

        qkv, proj = decide("qkv", 3 * c), decide("proj", c)
        whys = {"attention.self.query/key/value (one fused Linear)": qkv, "attention.output.dense": proj}
        whys |= {"intermediate.dense": mlp, "output.dense": mlp}
        return Split(mlp[0], qkv[0], proj[0]), whys

    def _merge_bf16x3(
        self, plan: Plan | None, merging: SwinPatchMerging, x: torch.Tensor
    ) -> tuple[bool, str]:
        """(bf16x3?, why) for `merging`'s reduction on a stage output like `x` (B, H, W, C), once per plan."""
        b, h, w, c = x.shape
        features, size = (4 * c, merging.reduction.out_features), (b, (h + 1) // 2, (w + 1) // 2)
        choose = lambda: linear_bf16x3_choice(plan, x, features, size)  # noqa: E731
        return choose() if plan is None else plan.decide(merging, "reduction-bf16x3", choose)

    def _note_blocks(self, plan: Plan, stage: SwinStage, x: torch.Tensor, split: Split, whys: dict) -> None:
        """The Linears of `stage`'s blocks (`_note_linears`, with each one's bf16x3 (choice, why) from
        `whys`); with ``split.mlp``, the MLP's two as one bf16x3 note."""
        block = stage.blocks[0]
        linears = block.linears()
        mlp = ("intermediate.dense", "output.dense")
        if split.mlp:
            linears = [item for item in linears if item[0] not in mlp]
            fc1 = block._fc1_weights().weight
            part = f"blocks.*.intermediate/output.dense (MLP): {fc1.shape[1]}->{fc1.shape[0]}, {x.dtype}"
            note_mlp_bf16x3(plan, stage, part, whys["intermediate.dense"][1])
        fused = block._fused_act is not None
        self._note_linears(
            plan, stage, linears, x, fused=fused, bf16x3={k: v for k, v in whys.items() if v[1]}
        )

    def _note_linears(
        self,
        plan: Plan,
        owner: nn.Module,
        linears: list[tuple[str, LinearWeights, bool]],
        x: torch.Tensor,
        fused: bool = False,
        bf16x3: dict[str, tuple[bool, str] | None] | None = None,
    ) -> None:
        """One note per Linear kind of `owner` (a stage's blocks share their shapes) on inputs like `x`:
        oneDNN or MKL, from the tests `fused_linear.linear` branches on (`linear_plan`), or bf16x3. `fused`:
        the activation goes to oneDNN as a post-op. `bf16x3`: the bf16x3 (choice, why) of the named Linears."""
        act = self.config["hidden_act"]
        prefix = "blocks.*." if isinstance(owner, SwinStage) else ""
        for name, lw, activated in linears:
            split = (bf16x3 or {}).get(name)
            impl, why = linear_plan(x, lw, act if activated else None, fused and activated, split)
            shape = f"{lw.weight.shape[1]}->{lw.weight.shape[0]}, {x.dtype}"
            plan.note(owner, f"{prefix}{name}: {shape}", impl, why)
