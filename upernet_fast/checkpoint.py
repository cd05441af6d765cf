"""Reading and writing Hugging Face-format UperNet checkpoints.

Sources: a local directory (config.json + model.safetensors | pytorch_model.bin | sharded *.index.json),
a hub id resolved through huggingface_hub's cache, or an in-memory transformers model. Weights are copied
tensor by tensor from memory-mapped files, so two full copies never coexist.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch

from .config import UperNetConfig

SAFE_SINGLE, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN_SINGLE, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
# Keys that transformers itself tolerates in old checkpoints and recomputes.
IGNORED_SUFFIXES = ("relative_position_index", "num_batches_tracked")


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: missing/unexpected keys, shapes, unreadable files."""


# ---------------------------------------------------------------------------------------------- sources
def _resolve_hub_id(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise FileNotFoundError(
            f"{repo_id!r} is not a local directory, and huggingface_hub is not installed to resolve it as a "
            "hub id; `pip install huggingface_hub` (and download it once), or pass a local directory "
            "holding config.json and model.safetensors"
        ) from None
    patterns = [
        "config.json",
        "*.safetensors",
        "*.safetensors.index.json",
        "pytorch_model*.bin",
        "*.bin.index.json",
    ]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, auth: all mean "not available"
        raise FileNotFoundError(
            f"could not resolve hub id {repo_id!r} ({type(e).__name__}: {e}). Download it once with network "
            "access (it is then read from the cache, also with HF_HUB_OFFLINE=1), or pass a local directory"
        ) from None


def _weight_files(directory: Path) -> list[Path]:
    for index_name in (SAFE_INDEX, BIN_INDEX):
        index = directory / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index} is not a valid shard index ({e})") from None
            files = [directory / f for f in sorted(set(weight_map.values()))]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"shard index {index} lists files that do not exist: {missing}")
            return files
    for name in (SAFE_SINGLE, BIN_SINGLE):
        if (directory / name).is_file():
            return [directory / name]
    raise FileNotFoundError(
        f"no weights in {directory}: expected {SAFE_SINGLE}, {BIN_SINGLE} or a sharded {SAFE_INDEX}"
    )


SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
}


class _Entry:
    """One checkpoint tensor: its shape (and dtype) known up front, its data read only when copied."""

    __slots__ = ("shape", "read", "dtype")

    def __init__(self, shape: tuple[int, ...], read: Any, dtype: torch.dtype | None = None) -> None:
        self.shape, self.read, self.dtype = tuple(shape), read, dtype


def _tensor_entry(tensor: torch.Tensor) -> _Entry:
    return _Entry(tensor.shape, (lambda: tensor), tensor.dtype)


def _entries(path: Path) -> dict[str, _Entry]:
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            f = safe_open(str(path), framework="pt")
            return {k: _safe_entry(f, k, path) for k in f.keys()}
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path} is truncated or not a safetensors file ({e})") from None
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - mmap needs the zip format: legacy (torch < 1.6) files load whole
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises many types for a corrupt zip/pickle
            raise CheckpointError(
                f"{path} is truncated or not a PyTorch checkpoint ({type(e).__name__}: {e})"
            ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state_dict of tensors")
    return {k: _tensor_entry(v) for k, v in state.items()}


def _safe_entry(f: Any, key: str, path: Path) -> _Entry:
    from safetensors import SafetensorError

    def read() -> torch.Tensor:
        try:
            return f.get_tensor(key)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: tensor {key!r} is unreadable ({e})") from None

    view = f.get_slice(key)
    return _Entry(view.get_shape(), read, SAFETENSORS_DTYPES.get(view.get_dtype()))


# ---------------------------------------------------------------------------------------------- loading
def copy_state_dict(model: torch.nn.Module, entries: dict[str, _Entry], strict: bool = True) -> None:
    """Check keys and shapes against `model` (naming every problem), then copy tensor by tensor."""
    expected = model.state_dict()
    entries = model.backbone.remap_state_dict(entries, "backbone.")
    entries = {k: v for k, v in entries.items() if not (k.endswith(IGNORED_SUFFIXES) and k not in expected)}
    optional = {"backbone." + k for k in getattr(model.backbone, "optional_keys", ())}
    missing = sorted(
        k
        for k in expected
        if k not in entries and not k.endswith("num_batches_tracked") and k not in optional
    )
    unexpected = sorted(k for k in entries if k not in expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_shorten(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_shorten(unexpected)}")
        if strict:
            raise CheckpointError("checkpoint does not match the config: " + "; ".join(parts))
        # transformers logs "newly initialized" weights; a silent random weight is a wrong model
        warnings.warn(
            "strict=False: checkpoint does not match the config: "
            + "; ".join(parts)
            + (" (missing weights keep their random initialisation)" if missing else "")
            + (" (unexpected keys are ignored)" if unexpected else ""),
            UserWarning,
            stacklevel=3,
        )
    mismatched = [
        f"{k}: checkpoint {v.shape} vs model {tuple(expected[k].shape)}"
        for k, v in entries.items()
        if k in expected and v.shape != tuple(expected[k].shape)
    ]
    if mismatched:
        raise CheckpointError(
            f"shape mismatch for {len(mismatched)} tensor(s): " + "; ".join(mismatched[:10])
        )
    absent = {k[len("backbone.") :] for k in optional if k not in entries}
    if absent and hasattr(model.backbone, "set_absent_optional_keys"):
        model.backbone.set_absent_optional_keys(absent)  # state_dict() then lists exactly the file's keys
    with torch.no_grad():
        for key, entry in entries.items():
            if key in expected:
                expected[key].copy_(entry.read())


def _shorten(keys: list[str], limit: int = 12) -> str:
    head = ", ".join(keys[:limit])
    return head + (f", ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float64": torch.float64,
    "fp64": torch.float64,
    "double": torch.float64,
}


def parse_dtype(dtype: Any) -> torch.dtype | str | None:
    """A floating torch dtype, "auto" or None from a dtype or its name ("bfloat16", "bf16", "torch.float32")."""
    if dtype is None or isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if isinstance(dtype, str):
        name = dtype.strip().lower().removeprefix("torch.")
        if name == "auto":
            return "auto"
        if name in DTYPE_NAMES:
            return DTYPE_NAMES[name]
    raise ValueError(
        f"dtype {dtype!r} is not supported; use a floating torch dtype, one of "
        f"{', '.join(sorted(DTYPE_NAMES))}, or 'auto' (the checkpoint's own)"
    )


def _stored_dtype(config_path: Path, entries: dict[str, _Entry]) -> torch.dtype | None:
    """The dtype a checkpoint was saved in: config.json's `dtype`/`torch_dtype` (what transformers writes),
    else the first floating-point tensor's."""
    try:
        raw = json.loads(config_path.read_text())
        name = raw.get("dtype") or raw.get("torch_dtype")
        if name:
            parsed = parse_dtype(name)
            if isinstance(parsed, torch.dtype):
                return parsed
    except (OSError, ValueError, AttributeError):
        pass
    for entry in entries.values():
        dtype = getattr(entry, "dtype", None)
        if dtype is not None and dtype.is_floating_point:
            return dtype
    return None


def resolve_dtype(dtype: Any, torch_dtype: Any) -> torch.dtype | str | None:
    """``dtype`` or transformers' older spelling ``torch_dtype`` (both parsed by ``parse_dtype``); an error
    when both are given and differ."""
    dtype, torch_dtype = parse_dtype(dtype), parse_dtype(torch_dtype)
    if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
        raise ValueError(f"dtype={dtype} and torch_dtype={torch_dtype} disagree; pass one of them")
    return torch_dtype if dtype is None else dtype


def open_source(source: Any) -> tuple[UperNetConfig, dict[str, _Entry], torch.dtype | None]:
    """(config, lazily read tensors, stored dtype) of a checkpoint directory, a ``config.json`` path, a hub
    id (from the local cache) or an in-memory transformers UperNet model. Nothing is copied yet."""
    if isinstance(source, torch.nn.Module):
        config = getattr(source, "config", None)
        if config is None or getattr(config, "model_type", None) != "upernet":
            raise TypeError(
                f"expected a transformers UperNetForSemanticSegmentation, got {type(source).__name__}"
            )
        entries = {k: _tensor_entry(v) for k, v in source.state_dict().items()}
        stored = next((p.dtype for p in source.parameters() if p.is_floating_point()), None)
        return UperNetConfig.from_any(config), entries, stored
    path = Path(os.fspath(source))
    if path.is_file() and path.name == "config.json":
        path = path.parent
    if not path.exists():
        if isinstance(source, str) and source.count("/") == 1 and not source.startswith((".", "/")):
            path = _resolve_hub_id(source)
        else:
            raise FileNotFoundError(f"{source} does not exist (expected a checkpoint directory or a hub id)")
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory (expected config.json + weights inside)")
    config = UperNetConfig.from_any(path / "config.json")
    entries: dict[str, _Entry] = {}
    for f in _weight_files(path):
        entries.update(_entries(f))
    return config, entries, _stored_dtype(path / "config.json", entries)


def save(
    state_dict: dict[str, torch.Tensor], config: UperNetConfig, save_directory: str | os.PathLike
) -> None:
    """Write ``config.json`` + ``model.safetensors`` in the layout transformers' ``from_pretrained`` reads."""
    from safetensors.torch import save_file

    directory = Path(save_directory)
    directory.mkdir(parents=True, exist_ok=True)
    # the tensors' dtype, as transformers writes it: a bf16 model reloads as bf16, not as the source's float32
    floating = [v.dtype for v in state_dict.values() if v.is_floating_point()]
    config.to_json_file(directory / "config.json", dtype=floating[0] if floating else None)
    state = {k: v.detach().contiguous().clone() for k, v in state_dict.items()}
    save_file(state, str(directory / SAFE_SINGLE), metadata={"format": "pt"})
