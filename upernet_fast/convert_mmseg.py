"""mmsegmentation UperNet checkpoints (ConvNeXt, Swin) -> Hugging Face format, and back (for tests).

The key mapping is that of transformers' `convert_convnext_upernet_to_pytorch.py` and
`convert_swin_upernet_to_pytorch.py` (the scripts that produced the `openmmlab/upernet-*` hub checkpoints):
- ConvNeXt: `downsample_layers.0` -> stem, `downsample_layers.i` -> `stages.i.downsampling_layer`,
  block `depthwise_conv/norm/pointwise_conv1/pointwise_conv2/gamma` -> `dwconv/layernorm/pwconv1/pwconv2/
  layer_scale_parameter`, `norm{i}` -> `hidden_states_norms.stage{i+1}`;
- Swin: `qkv` split into query/key/value (in that order), patch-merging `reduction`/`norm` weights reordered
  from mmseg's nn.Unfold layout (channel-major, kernel positions (0,0),(0,1),(1,0),(1,1)) to the HF concat
  order ((0,0),(1,0),(0,1),(1,1)): the `reverse_correct_unfold_*` functions; `relative_position_index`
  dropped (HF computes it);
- heads: `.bn.` -> `.batch_norm.`, `conv_seg` -> `classifier`.
The architecture (depths, widths, heads, window, MLP ratio, classes, head widths) is read from tensor shapes.
We write the on-disk (hub) key layout, which both transformers and `upernet_fast.load` read.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from .palette import ADE20K_CLASSES

StateDict = dict[str, torch.Tensor]

_CONVNEXT_BLOCK = {
    "gamma": "layer_scale_parameter",
    "depthwise_conv": "dwconv",
    "norm": "layernorm",
    "pointwise_conv1": "pwconv1",
    "pointwise_conv2": "pwconv2",
}
_SWIN_BLOCK = {
    "norm1": "layernorm_before",
    "attn.w_msa.relative_position_bias_table": "attention.self.relative_position_bias_table",
    "attn.w_msa.proj": "attention.output.dense",
    "norm2": "layernorm_after",
    "ffn.layers.0.0": "intermediate.dense",
    "ffn.layers.1": "output.dense",
}


# ----------------------------------------------------------------------------- patch-merging reordering
def correct_unfold_reduction_order(x: torch.Tensor) -> torch.Tensor:
    """HF -> mmseg layout of the patch-merging `reduction` weight (out, 4C)."""
    out_channel, in_channel = x.shape
    x = x.reshape(out_channel, 4, in_channel // 4)
    return x[:, [0, 2, 1, 3], :].transpose(1, 2).reshape(out_channel, in_channel)


def reverse_correct_unfold_reduction_order(x: torch.Tensor) -> torch.Tensor:
    """mmseg -> HF layout of the patch-merging `reduction` weight (out, 4C)."""
    out_channel, in_channel = x.shape
    x = x.reshape(out_channel, in_channel // 4, 4)
    return x[:, :, [0, 2, 1, 3]].transpose(1, 2).reshape(out_channel, in_channel)


def correct_unfold_norm_order(x: torch.Tensor) -> torch.Tensor:
    """HF -> mmseg layout of the patch-merging `norm` weight/bias (4C,)."""
    in_channel = x.shape[0]
    x = x.reshape(4, in_channel // 4)
    return x[[0, 2, 1, 3], :].transpose(0, 1).reshape(in_channel)


def reverse_correct_unfold_norm_order(x: torch.Tensor) -> torch.Tensor:
    """mmseg -> HF layout of the patch-merging `norm` weight/bias (4C,)."""
    in_channel = x.shape[0]
    x = x.reshape(in_channel // 4, 4)
    return x[:, [0, 2, 1, 3]].transpose(0, 1).reshape(in_channel)


# ----------------------------------------------------------------------------- shape inspection
def _count(state_dict: StateDict, pattern: str) -> int:
    """Number of distinct integers captured by `pattern` (one group) over the keys."""
    found = {int(m.group(1)) for k in state_dict if (m := re.fullmatch(pattern, k))}
    return max(found) + 1 if found else 0


def detect_backbone(state_dict: StateDict) -> str:
    if any(k.startswith("backbone.downsample_layers.") for k in state_dict):
        return "convnext"
    if any(".attn.w_msa." in k for k in state_dict):
        return "swin"
    if any(
        k.startswith("backbone.encoder.layers.")
        or k.startswith("backbone.embeddings.patch_embeddings.projection")
        for k in state_dict
    ):
        raise ValueError("this looks like a Hugging Face checkpoint already, not an mmsegmentation one")
    raise ValueError("unsupported mmsegmentation backbone (supported: ConvNeXt, Swin)")


def _out_features(state_dict: StateDict, num_stages: int) -> list[str]:
    present = [i for i in range(num_stages) if f"backbone.norm{i}.weight" in state_dict]
    if not present:
        raise ValueError("no backbone output norms (backbone.norm{i}) found")
    return [f"stage{i + 1}" for i in present]


def _convnext_config(sd: StateDict) -> dict[str, Any]:
    num_stages = _count(sd, r"backbone\.stages\.(\d+)\..*")
    depths = [_count(sd, rf"backbone\.stages\.{i}\.(\d+)\..*") for i in range(num_stages)]
    hidden_sizes = [
        int(sd[f"backbone.stages.{i}.0.depthwise_conv.weight"].shape[0]) for i in range(num_stages)
    ]
    has_gamma = "backbone.stages.0.0.gamma" in sd
    out_features = _out_features(sd, num_stages)
    return {
        "model_type": "convnext",
        "num_channels": int(sd["backbone.downsample_layers.0.0.weight"].shape[1]),
        "patch_size": int(sd["backbone.downsample_layers.0.0.weight"].shape[-1]),
        "num_stages": num_stages,
        "hidden_sizes": hidden_sizes,
        "depths": depths,
        "hidden_act": "gelu",
        "layer_scale_init_value": 1e-6 if has_gamma else 0.0,
        "drop_path_rate": 0.0,
        "out_features": out_features,
        "out_indices": [int(f[5:]) for f in out_features],
    }


def _swin_config(sd: StateDict) -> dict[str, Any]:
    num_stages = _count(sd, r"backbone\.stages\.(\d+)\..*")
    depths = [_count(sd, rf"backbone\.stages\.{i}\.blocks\.(\d+)\..*") for i in range(num_stages)]
    embed_dim = int(sd["backbone.patch_embed.projection.weight"].shape[0])
    heads, window = [], None
    for i in range(num_stages):
        table = sd[f"backbone.stages.{i}.blocks.0.attn.w_msa.relative_position_bias_table"]
        heads.append(int(table.shape[1]))
        side = (math.isqrt(table.shape[0]) + 1) // 2
        if (2 * side - 1) ** 2 != table.shape[0] or (window is not None and side != window):
            raise ValueError(f"cannot infer the window size from a bias table of shape {tuple(table.shape)}")
        window = side
    mlp_hidden = sd["backbone.stages.0.blocks.0.ffn.layers.0.0.weight"].shape[0]
    if any(k.startswith("backbone.absolute_pos_embed") for k in sd):
        raise NotImplementedError("Swin with absolute position embeddings is not supported")
    out_features = _out_features(sd, num_stages)
    return {
        "model_type": "swin",
        "num_channels": int(sd["backbone.patch_embed.projection.weight"].shape[1]),
        "patch_size": int(sd["backbone.patch_embed.projection.weight"].shape[-1]),
        "embed_dim": embed_dim,
        "depths": depths,
        "num_heads": heads,
        "window_size": window,
        "mlp_ratio": float(mlp_hidden) / embed_dim,
        "qkv_bias": "backbone.stages.0.blocks.0.attn.w_msa.qkv.bias" in sd,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
        "use_absolute_embeddings": False,
        "drop_path_rate": 0.0,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "out_features": out_features,
        "out_indices": [int(f[5:]) for f in out_features],
    }


def _class_names(meta: dict | None, num_labels: int) -> list[str]:
    """Class names from mmseg 0.x (`meta["CLASSES"]`) or 1.x (`meta["dataset_meta"]["classes"]`) metadata."""
    meta = meta or {}
    names = meta.get("CLASSES") or (meta.get("dataset_meta") or {}).get("classes")
    if names is not None and len(names) == num_labels:
        return [str(n).strip() for n in names]
    if num_labels == len(ADE20K_CLASSES):
        return list(ADE20K_CLASSES)
    return [f"LABEL_{i}" for i in range(num_labels)]


def _pool_scales_from_meta(meta: dict | None) -> list[int] | None:
    """mmseg 0.x stores the config text in `meta["config"]`: read `pool_scales=(...)` from it if present."""
    text = (meta or {}).get("config")
    if isinstance(text, str) and (m := re.search(r"pool_scales\s*=\s*[\(\[]([\d,\s]+)[\)\]]", text)):
        return [int(v) for v in m.group(1).replace(" ", "").split(",") if v]
    return None


def _head_config(sd: StateDict, meta: dict | None, pool_scales: list[int] | None) -> dict[str, Any]:
    num_labels = int(sd["decode_head.conv_seg.weight"].shape[0])
    num_pools = _count(sd, r"decode_head\.psp_modules\.(\d+)\..*")
    pool_scales = pool_scales or _pool_scales_from_meta(meta) or [1, 2, 3, 6]
    if len(pool_scales) != num_pools:
        raise ValueError(f"checkpoint has {num_pools} pooling branches; pass pool_scales (got {pool_scales})")
    names = _class_names(meta, num_labels)
    config: dict[str, Any] = {
        "model_type": "upernet",
        "architectures": ["UperNetForSemanticSegmentation"],
        "hidden_size": int(sd["decode_head.bottleneck.conv.weight"].shape[0]),
        "pool_scales": list(pool_scales),
        "num_labels": num_labels,
        "id2label": {str(i): n for i, n in enumerate(names)},
        "label2id": {n: i for i, n in enumerate(names)},
        "initializer_range": 0.02,
        "loss_ignore_index": 255,
        "use_auxiliary_head": "auxiliary_head.conv_seg.weight" in sd,
        "auxiliary_loss_weight": 0.4,
    }
    if config["use_auxiliary_head"]:
        convs = _count(sd, r"auxiliary_head\.convs\.(\d+)\..*")
        first = sd["auxiliary_head.convs.0.conv.weight"] if convs else sd["auxiliary_head.conv_seg.weight"]
        config.update(
            auxiliary_in_channels=int(first.shape[1]),
            auxiliary_channels=int(sd["auxiliary_head.conv_seg.weight"].shape[1]),
            auxiliary_num_convs=convs,
            auxiliary_concat_input="auxiliary_head.conv_cat.conv.weight" in sd,
        )
    return config


# ----------------------------------------------------------------------------- key mapping
def _rename_head(key: str) -> str:
    key = key.replace(".bn.", ".batch_norm.").replace(".conv_seg.", ".classifier.")
    return key


def _convnext_key(key: str) -> str:
    if m := re.fullmatch(r"backbone\.downsample_layers\.0\.([01])\.(\w+)", key):
        return f"backbone.embeddings.{('patch_embeddings', 'layernorm')[int(m.group(1))]}.{m.group(2)}"
    if m := re.fullmatch(r"backbone\.downsample_layers\.(\d+)\.(.+)", key):
        return f"backbone.encoder.stages.{m.group(1)}.downsampling_layer.{m.group(2)}"
    if m := re.fullmatch(
        r"backbone\.stages\.(\d+)\.(\d+)\.(gamma|depthwise_conv|norm|pointwise_conv[12])(.*)", key
    ):
        return f"backbone.encoder.stages.{m.group(1)}.layers.{m.group(2)}.{_CONVNEXT_BLOCK[m.group(3)]}{m.group(4)}"
    if m := re.fullmatch(r"backbone\.norm(\d+)\.(\w+)", key):
        return f"backbone.hidden_states_norms.stage{int(m.group(1)) + 1}.{m.group(2)}"
    return key


def _swin_key(key: str) -> str:
    if m := re.fullmatch(r"backbone\.patch_embed\.(projection|norm)\.(\w+)", key):
        part = "patch_embeddings.projection" if m.group(1) == "projection" else "norm"
        return f"backbone.embeddings.{part}.{m.group(2)}"
    if m := re.fullmatch(
        r"backbone\.stages\.(\d+)\.blocks\.(\d+)\.(.+)\.(weight|bias|relative_position_bias_table)", key
    ):
        stage, block, name, leaf = m.groups()
        if leaf == "relative_position_bias_table":
            name, leaf = f"{name}.{leaf}", ""
        new = _SWIN_BLOCK.get(name)
        if new is not None:
            return f"backbone.encoder.layers.{stage}.blocks.{block}.{new}" + (f".{leaf}" if leaf else "")
    if m := re.fullmatch(r"backbone\.stages\.(\d+)\.downsample\.(.+)", key):
        return f"backbone.encoder.layers.{m.group(1)}.downsample.{m.group(2)}"
    if m := re.fullmatch(r"backbone\.norm(\d+)\.(\w+)", key):
        return f"backbone.hidden_states_norms.stage{int(m.group(1)) + 1}.{m.group(2)}"
    return key


def convert_mmseg_checkpoint(
    state_dict: StateDict,
    meta: dict | None = None,
    *,
    pool_scales: list[int] | None = None,
    id2label: dict[int, str] | None = None,
) -> tuple[dict[str, Any], StateDict]:
    """mmseg UperNet `state_dict` -> (HF `config.json` dict, HF state dict in the hub's on-disk layout).

    `meta` (the checkpoint's "meta") supplies class names and, for mmseg 0.x, the pool scales; otherwise
    150 classes get ADE20K's names and the pool scales default to (1, 2, 3, 6)."""
    sd = dict(state_dict)
    backbone = detect_backbone(sd)
    backbone_config = _convnext_config(sd) if backbone == "convnext" else _swin_config(sd)
    config = _head_config(sd, meta, pool_scales)
    config["backbone_config"] = backbone_config
    if id2label is not None:
        config["id2label"] = {str(k): v for k, v in id2label.items()}
        config["label2id"] = {v: int(k) for k, v in id2label.items()}

    out: StateDict = {}
    for key, value in sd.items():
        value = value.float() if value.is_floating_point() else value  # fp16-trained checkpoints -> fp32
        if key.startswith(("decode_head.", "auxiliary_head.")):
            out[_rename_head(key)] = value
        elif not key.startswith("backbone."):
            continue  # e.g. data_preprocessor buffers of mmseg 1.x
        elif backbone == "convnext":
            if key.endswith("pointwise_conv1.weight") or key.endswith("pointwise_conv2.weight"):
                value = value.reshape(value.shape[0], -1)  # 1x1-conv variant (linear_pw_conv=False)
            out[_convnext_key(key)] = value
        elif key.endswith("relative_position_index"):
            continue
        elif m := re.fullmatch(
            r"backbone\.stages\.(\d+)\.blocks\.(\d+)\.attn\.w_msa\.qkv\.(weight|bias)", key
        ):
            prefix = f"backbone.encoder.layers.{m.group(1)}.blocks.{m.group(2)}.attention.self"
            for name, part in zip(("query", "key", "value"), value.chunk(3, dim=0)):
                out[f"{prefix}.{name}.{m.group(3)}"] = part.clone()
        else:
            if ".downsample.reduction." in key:
                value = reverse_correct_unfold_reduction_order(value)
            elif ".downsample.norm." in key:
                value = reverse_correct_unfold_norm_order(value)
            out[_swin_key(key)] = value
    known = (
        "backbone.embeddings.",
        "backbone.encoder.",
        "backbone.hidden_states_norms.",
        "decode_head.",
        "auxiliary_head.",
    )
    unknown = [k for k in out if not k.startswith(known)]
    if unknown:
        raise ValueError(f"unmapped backbone keys: {unknown[:5]}")
    return config, {k: v.contiguous() for k, v in out.items()}


# ----------------------------------------------------------------------------- inverse (tests)
def hf_to_mmseg(hf_state_dict: StateDict, config: dict[str, Any]) -> StateDict:
    """HF UperNet state dict (on-disk layout) -> mmseg layout: the inverse of `convert_mmseg_checkpoint`."""
    backbone = config["backbone_config"]["model_type"]
    out: StateDict = {}
    for key, value in hf_state_dict.items():
        if key.startswith(("decode_head.", "auxiliary_head.")):
            out[key.replace(".batch_norm.", ".bn.").replace(".classifier.", ".conv_seg.")] = value
            continue
        if backbone == "convnext":
            inverse = {v: k for k, v in _CONVNEXT_BLOCK.items()}
            if m := re.fullmatch(r"backbone\.embeddings\.(patch_embeddings|layernorm)\.(\w+)", key):
                out[f"backbone.downsample_layers.0.{int(m.group(1) == 'layernorm')}.{m.group(2)}"] = value
            elif m := re.fullmatch(r"backbone\.encoder\.stages\.(\d+)\.downsampling_layer\.(.+)", key):
                out[f"backbone.downsample_layers.{m.group(1)}.{m.group(2)}"] = value
            elif m := re.fullmatch(r"backbone\.encoder\.stages\.(\d+)\.layers\.(\d+)\.(\w+)(.*)", key):
                out[f"backbone.stages.{m.group(1)}.{m.group(2)}.{inverse[m.group(3)]}{m.group(4)}"] = value
            elif m := re.fullmatch(r"backbone\.hidden_states_norms\.stage(\d+)\.(\w+)", key):
                out[f"backbone.norm{int(m.group(1)) - 1}.{m.group(2)}"] = value
            else:
                raise KeyError(f"unexpected ConvNeXt key {key}")
            continue
        inverse = {v: k for k, v in _SWIN_BLOCK.items()}
        if m := re.fullmatch(r"backbone\.embeddings\.(patch_embeddings\.projection|norm)\.(\w+)", key):
            part = "projection" if m.group(1).startswith("patch") else "norm"
            out[f"backbone.patch_embed.{part}.{m.group(2)}"] = value
        elif m := re.fullmatch(
            r"backbone\.encoder\.layers\.(\d+)\.blocks\.(\d+)\.attention\.self\.(query|key|value)\.(\w+)", key
        ):
            stage, block, which, leaf = m.groups()
            if which != "query":
                continue  # merged with query below
            prefix = f"backbone.encoder.layers.{stage}.blocks.{block}.attention.self"
            parts = [hf_state_dict[f"{prefix}.{n}.{leaf}"] for n in ("query", "key", "value")]
            out[f"backbone.stages.{stage}.blocks.{block}.attn.w_msa.qkv.{leaf}"] = torch.cat(parts, 0)
        elif m := re.fullmatch(
            r"backbone\.encoder\.layers\.(\d+)\.blocks\.(\d+)\.(.+)\.(weight|bias|relative_position_bias_table)",
            key,
        ):
            stage, block, name, leaf = m.groups()
            if leaf == "relative_position_bias_table":
                name, leaf = f"{name}.{leaf}", ""
            tail = f".{leaf}" if leaf else ""
            out[f"backbone.stages.{stage}.blocks.{block}.{inverse[name]}{tail}"] = value
        elif m := re.fullmatch(r"backbone\.encoder\.layers\.(\d+)\.downsample\.(reduction|norm)\.(\w+)", key):
            fix = correct_unfold_reduction_order if m.group(2) == "reduction" else correct_unfold_norm_order
            out[f"backbone.stages.{m.group(1)}.downsample.{m.group(2)}.{m.group(3)}"] = fix(value)
        elif m := re.fullmatch(r"backbone\.hidden_states_norms\.stage(\d+)\.(\w+)", key):
            out[f"backbone.norm{int(m.group(1)) - 1}.{m.group(2)}"] = value
        elif key.startswith("backbone.layernorm.") or key.startswith("backbone.swin.layernorm."):
            continue  # HF-only final norm, unused by UperNet
        else:
            raise KeyError(f"unexpected Swin key {key}")
    return out


# ----------------------------------------------------------------------------- files
def load_mmseg_file(path: str | os.PathLike) -> tuple[StateDict, dict | None]:
    """(state_dict, meta) of an mmseg `.pth` (a dict with "state_dict", or a bare state dict)."""
    try:  # weights_only=False: mmseg's meta holds plain Python objects
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except (EOFError, pickle.UnpicklingError, RuntimeError) as exc:  # empty, truncated, not a pickle/zip
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})") from exc
    if isinstance(checkpoint, dict) and "state_dict" in checkpoint:
        return checkpoint["state_dict"], checkpoint.get("meta")
    if isinstance(checkpoint, dict) and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return checkpoint, None
    raise ValueError(f"{path}: not an mmsegmentation checkpoint (no 'state_dict')")


def save_hf(config: dict[str, Any], state_dict: StateDict, out_dir: str | os.PathLike) -> Path:
    """Write `config.json` and `model.safetensors` (the `save_pretrained` file layout)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(
        {k: v.contiguous() for k, v in state_dict.items()},
        str(out / "model.safetensors"),
        metadata={"format": "pt"},
    )
    return out


def convert_file(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    pool_scales: list[int] | None = None,
    overwrite: bool = False,
) -> Path:
    """mmseg `.pth` -> HF-format directory (config.json + model.safetensors + preprocessor_config.json).

    Nothing is written unless the converted weights load into the converted config exactly (every key,
    no extra, every shape: `CheckpointError` names the problems otherwise), nor over a folder that already
    holds a checkpoint unless `overwrite`."""
    from .checkpoint import _tensor_entry, copy_state_dict
    from .model import FastUperNet
    from .preprocess import processor_config

    existing = [n for n in ("config.json", "model.safetensors") if (Path(out_dir) / n).exists()]
    if existing and not overwrite:
        raise ValueError(
            f"{out_dir} already holds a checkpoint ({', '.join(existing)}); "
            "overwrite=True (CLI: --overwrite) replaces it"
        )
    state_dict, meta = load_mmseg_file(checkpoint)
    try:
        config, hf_state_dict = convert_mmseg_checkpoint(state_dict, meta, pool_scales=pool_scales)
    except KeyError as exc:
        raise ValueError(f"{checkpoint}: no {exc} tensor, which an mmseg UperNet checkpoint has") from None
    model = FastUperNet.from_config(config)  # the check `load()` will make, before anything is written
    copy_state_dict(model, {k: _tensor_entry(v) for k, v in hf_state_dict.items()})
    out = save_hf(config, hf_state_dict, out_dir)
    (out / "preprocessor_config.json").write_text(json.dumps(processor_config((512, 512)), indent=2) + "\n")
    return out
