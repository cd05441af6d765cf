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
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import Backbone, BackboneOutput, stage_selection

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


class SwinPatchEmbeddings(nn.Module):
    def __init__(self, patch_size: tuple[int, int], num_channels: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.projection = nn.Conv2d(num_channels, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        h, w = pixel_values.shape[-2:]
        ph, pw = self.patch_size
        pixel_values = F.pad(pixel_values, (0, (-w) % pw, 0, (-h) % ph))
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

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.patch_embeddings(pixel_values).permute(0, 2, 3, 1))  # (B, H, W, C)
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
        self._cache: dict[tuple, torch.Tensor] = {}  # replaced, never mutated: safe to read from any thread

    def _bias_mask(self, hp: int, wp: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Relative position bias (+ shift mask): (1, heads, N, N) or (num_windows, heads, N, N)."""
        table = self.attention.self.relative_position_bias_table
        # Cache only when no autograd graph can need it; `_version` changes on every in-place load/copy_.
        cacheable = not torch.is_grad_enabled() and not torch.compiler.is_compiling()
        key = (hp, wp, dtype, device, table._version, table.data_ptr())
        if cacheable and (hit := self._cache.get(key)) is not None:
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
    a missing-key error, since pre-5 hub files do not have it (transformers ignores it the same way)."""

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        if prefix + "weight" in state_dict or prefix + "bias" in state_dict:
            super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _to_nchw(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2).contiguous()


class SwinBackbone(Backbone):
    """Drop-in for transformers' `SwinBackbone`; `config` is the raw `backbone_config` dict of an UperNet config."""

    # state_dict keys a checkpoint may lack (pre-transformers-5 hub files): the unused final norm.
    optional_keys = ("swin.layernorm.weight", "swin.layernorm.bias")

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        cfg = {**SWIN_DEFAULTS, **{k: v for k, v in config.items() if k in SWIN_DEFAULTS}}
        if cfg["hidden_act"] not in _ACT:
            raise ValueError(f"unsupported Swin hidden_act {cfg['hidden_act']!r}")
        num_stages = len(cfg["depths"])
        self.config = cfg
        self.num_channels = cfg["num_channels"]
        self.stage_names = ["stem"] + [f"stage{i}" for i in range(1, num_stages + 1)]
        selected = set(stage_selection(config, num_stages))
        self.out_features = [s for s in self.stage_names if s in selected]  # transformers returns stage order
        num_features = [cfg["embed_dim"]] + [cfg["embed_dim"] * 2**i for i in range(num_stages)]
        self.channels = [num_features[self.stage_names.index(s)] for s in self.out_features]
        deepest = self.stage_names.index(self.out_features[-1])
        self.reduction = _pair(cfg["patch_size"])[0] * 2 ** max(deepest - 1, 0)
        self._deepest = deepest

        self.embeddings = SwinEmbeddings(cfg)
        self.encoder = SwinEncoder(cfg)
        # Never applied (SwinBackbone ignores it too); kept so state_dict keys equal transformers 5's files.
        self.swin = nn.Module()
        self.swin.layernorm = _OptionalLayerNorm(num_features[-1], eps=cfg["layer_norm_eps"])
        self.hidden_states_norms = nn.ModuleDict(
            {s: nn.LayerNorm(c) for s, c in zip(self.out_features, self.channels)}
        )

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
        self, pixel_values: torch.Tensor, output_hidden_states: bool = False, output_attentions: bool = False
    ) -> BackboneOutput:
        x = self.embeddings(pixel_values)
        hidden_states = [_to_nchw(x)] if output_hidden_states else None
        attentions = [] if output_attentions else None
        feature_maps = []
        if "stem" in self.out_features:
            feature_maps.append(_to_nchw(self.hidden_states_norms["stem"](x)))
        # Stages past the deepest selected one change no output unless all hidden states/attentions are wanted.
        last = len(self.encoder.layers) if (output_hidden_states or output_attentions) else self._deepest
        for i, stage in enumerate(self.encoder.layers[:last]):
            weights = None
            for block in stage.blocks:
                x, weights = block(x, need_weights=output_attentions)
            name = f"stage{i + 1}"
            if name in self.hidden_states_norms:
                feature_maps.append(_to_nchw(self.hidden_states_norms[name](x)))
            if hidden_states is not None:
                hidden_states.append(_to_nchw(x))
            if attentions is not None:
                attentions.append(weights)
            if stage.downsample is not None and i + 1 < last:
                x = stage.downsample(x)
        return BackboneOutput(
            feature_maps=tuple(feature_maps),
            hidden_states=tuple(hidden_states) if hidden_states is not None else None,
            attentions=tuple(attentions) if attentions is not None else None,
        )
