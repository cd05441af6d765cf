"""Swin backbone forward for dynamic-shape export: transformers' `SwinBackbone` semantics (see
`backbones/swin.py`), written so that no size relation has to be decided while tracing.

With symbolic sizes, reshapes and transposes that merge or move a window-count dimension make the tracer
guard on that count being 1, which specialises the export to the traced size. So here:
- pad + cyclic shift + window partition is ONE row gather from an index built by arange arithmetic on the
  runtime sizes (padded slots read an appended zero token: transformers pads after the norm), and the
  inverse gather un-partitions, rolls back and crops; the window count stays a leading dim that is never
  permuted, and reshapes that cross it go through a flat view (splitting one flat dim needs no guard);
- the shift mask is built from the runtime padded size; attention is explicit (matmul, softmax, matmul).
Eager results equal the backbone's own forward to float rounding (tests/test_onnx_export.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backbones.swin import SwinBackbone, SwinLayer, SwinPatchMerging

__all__ = ["swin_feature_maps"]


def _flat_view(x: torch.Tensor, *shape: object) -> torch.Tensor:
    """`x.reshape(shape)` through a flat view (no size-1 guards with symbolic sizes)."""
    return x.contiguous().view(-1).view(*shape)


def _wrap(v: torch.Tensor, period) -> torch.Tensor:
    """`v % period` for v in [-period, 2 * period) (the ONNX exporter cannot translate `tensor % SymInt`)."""
    return torch.where(v < 0, v + period, torch.where(v >= period, v - period, v))


def _divmod(v: torch.Tensor, d) -> tuple[torch.Tensor, torch.Tensor]:
    """Floor division and remainder of non-negative v by d (an int or a runtime size)."""
    if not isinstance(d, int):
        d = torch.ones((), dtype=v.dtype, device=v.device) * d  # a graph value, not a SymInt scalar
    q = torch.div(v, d, rounding_mode="floor")
    return q, v - q * d


def _window_slots(h, w, ws: int, shift: int, device: torch.device):
    """Gather index (nh*nw*ws², into h*w token rows; h*w = the zero token) of pad + roll(-shift) + window
    partition; scatter index (h*w, into window slots) of the inverse (un-partition, roll back, crop); and
    each slot's shift-mask region. All 1-D: a 2-D index with a window-count dim makes the tracer guard on
    that count being 1 when it checks contiguity."""
    nh, nw = (h + ws - 1) // ws, (w + ws - 1) // ws
    hp, wp, n = nh * ws, nw * ws, ws * ws
    window, k = _divmod(torch.arange(nh * nw * n, device=device), n)
    wy, wx = _divmod(window, nw)
    ky, kx = _divmod(k, ws)
    py, px = wy * ws + ky, wx * ws + kx  # slot position in the rolled, padded map
    r, c = _wrap(py + shift, hp), _wrap(px + shift, wp)  # its source position (roll by -shift)
    gather = torch.where((r < h) & (c < w), r * w + c, h * w)
    i, j = _divmod(torch.arange(h * w, device=device), w)
    p, q = _wrap(i - shift, hp), _wrap(j - shift, wp)  # where token (i, j) sits in the rolled map
    (p_win, p_in), (q_win, q_in) = _divmod(p, ws), _divmod(q, ws)
    scatter = (p_win * nw + q_win) * n + p_in * ws + q_in
    # transformers' `get_attn_mask` regions (0, 1, 2 per axis) of the rolled, padded map
    region = ((py >= hp - ws).long() + (py >= hp - shift).long()) * 3
    region = region + (px >= wp - ws).long() + (px >= wp - shift).long()
    return gather, scatter, region, nh * nw


def _block(block: SwinLayer, x: torch.Tensor) -> torch.Tensor:
    """One Swin layer on x (B, H, W, C), transformers' eager math."""
    b, h, w, c = x.shape
    ws, shift, heads = block.window_size, block.shift_size, block.num_heads
    n, d = ws * ws, c // heads
    gather, scatter, region, num_windows = _window_slots(h, w, ws, shift, x.device)
    tokens = _flat_view(block.layernorm_before(x), b, h * w, c)
    tokens = torch.cat([tokens, tokens.new_zeros(b, 1, c)], 1)  # transformers pads after the norm: zeros
    windows = tokens.index_select(1, gather).view(b, num_windows, n, c)

    s = block.attention.self
    weight = torch.cat([s.query.weight, s.key.weight, s.value.weight])
    bias = None if s.query.bias is None else torch.cat([s.query.bias, s.key.bias, s.value.bias])
    q, k, v = F.linear(windows, weight, bias).view(b, num_windows, n, 3, heads, d).unbind(3)
    q, k, v = q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3)  # (B, nW, heads, N, d)
    scores = torch.matmul(q, k.transpose(-1, -2)) * d**-0.5
    rel = s.relative_position_bias_table[s.relative_position_index].view(n, n, -1).permute(2, 0, 1)
    scores = scores + rel  # (heads, N, N) broadcasts over (B, nW)
    if shift:
        region = region.view(num_windows, 1, n)
        mask = torch.where(region.transpose(1, 2) != region, -100.0, 0.0).to(scores.dtype)  # (nW, N, N)
        scores = scores + mask[:, None]
    out = torch.matmul(scores.softmax(-1), v).transpose(2, 3).reshape(b, num_windows, n, c)
    out = block.attention.output.dense(out)
    out = _flat_view(out, b, num_windows * n, c).index_select(1, scatter).view(b, h, w, c)
    x = x + out
    return x + block.output.dense(block.act(block.intermediate.dense(block.layernorm_after(x))))


def _merge(merging: SwinPatchMerging, x: torch.Tensor) -> torch.Tensor:
    """Patch merging: zero-pad to even, channel groups [0::2,0::2], [1::2,0::2], [0::2,1::2], [1::2,1::2]."""
    b, h, w, c = x.shape
    h2, w2 = (h + 1) // 2, (w + 1) // 2
    x = F.pad(x, (0, 0, 0, 2 * w2 - w, 0, 2 * h2 - h)).view(b, h2, 2, w2, 2, c)
    x = torch.cat([x[:, :, 0, :, 0], x[:, :, 1, :, 0], x[:, :, 0, :, 1], x[:, :, 1, :, 1]], -1)
    return merging.reduction(merging.norm(x))


def swin_feature_maps(backbone: SwinBackbone, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`backbone(pixel_values).feature_maps` (no hidden states or attentions), traceable at symbolic sizes."""
    x = backbone.embeddings(pixel_values)  # (B, H, W, C)
    norms = backbone.hidden_states_norms
    feature_maps = []
    if "stem" in norms:
        feature_maps.append(norms["stem"](x).permute(0, 3, 1, 2))
    last = backbone._deepest
    for i, stage in enumerate(backbone.encoder.layers[:last]):
        for block in stage.blocks:
            x = _block(block, x)
        name = f"stage{i + 1}"
        if name in norms:
            feature_maps.append(norms[name](x).permute(0, 3, 1, 2))
        if stage.downsample is not None and i + 1 < last:
            x = _merge(stage.downsample, x)
    return tuple(feature_maps)
