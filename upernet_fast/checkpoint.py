"""Reading and writing Hugging Face-format UperNet checkpoints.

Sources: a local directory (config.json + model.safetensors | pytorch_model.bin | sharded *.index.json),
a hub id resolved through huggingface_hub's cache, or an in-memory transformers model. Weights are copied
tensor by tensor from memory-mapped files, so two full copies never coexist.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .config import UperNetConfig
from .model import FastUperNet

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


class _Entry:
    """One checkpoint tensor: its shape is known up front, its data read only when copied."""

    __slots__ = ("shape", "read")

    def __init__(self, shape: tuple[int, ...], read: Any) -> None:
        self.shape, self.read = tuple(shape), read


def _entries(path: Path) -> dict[str, _Entry]:
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            f = safe_open(str(path), framework="pt")
            return {k: _Entry(f.get_slice(k).get_shape(), _safe_reader(f, k, path)) for k in f.keys()}
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path} is truncated or not a safetensors file ({e})") from None
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for a corrupt zip/pickle
        raise CheckpointError(
            f"{path} is truncated or not a PyTorch checkpoint ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state_dict of tensors")
    return {k: _Entry(v.shape, (lambda v=v: v)) for k, v in state.items()}


def _safe_reader(f: Any, key: str, path: Path) -> Any:
    from safetensors import SafetensorError

    def read() -> torch.Tensor:
        try:
            return f.get_tensor(key)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: tensor {key!r} is unreadable ({e})") from None

    return read


# ---------------------------------------------------------------------------------------------- loading
def copy_state_dict(model: FastUperNet, entries: dict[str, _Entry], strict: bool = True) -> None:
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
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_shorten(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_shorten(unexpected)}")
        raise CheckpointError("checkpoint does not match the config: " + "; ".join(parts))
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


def load(
    source: Any,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    backend: str | None = None,
    winograd: bool | None = None,
    strict: bool = True,
) -> FastUperNet:
    """A `FastUperNet` in eval mode from a directory, a hub id, or a transformers UperNet model.

    `backend` ("auto" | "triton" | "torch"; None reads `UPERNET_FAST_BACKEND`) and `winograd` (None reads
    `UPERNET_FAST_WINOGRAD`, default on) choose the fast paths; see `upernet_fast.dispatch`."""
    if isinstance(source, torch.nn.Module):
        config = getattr(source, "config", None)
        if config is None or getattr(config, "model_type", None) != "upernet":
            raise TypeError(
                f"expected a transformers UperNetForSemanticSegmentation, got {type(source).__name__}"
            )
        model = FastUperNet(UperNetConfig.from_any(config), backend=backend, winograd=winograd)
        entries = {k: _Entry(v.shape, (lambda v=v: v)) for k, v in source.state_dict().items()}
        copy_state_dict(model, entries, strict=strict)
    else:
        path = Path(os.fspath(source))
        if path.is_file() and path.name == "config.json":
            path = path.parent
        if not path.exists():
            if isinstance(source, str) and source.count("/") == 1 and not source.startswith((".", "/")):
                path = _resolve_hub_id(source)
            else:
                raise FileNotFoundError(
                    f"{source} does not exist (expected a checkpoint directory or a hub id)"
                )
        if not path.is_dir():
            raise FileNotFoundError(f"{path} is not a directory (expected config.json + weights inside)")
        config = UperNetConfig.from_any(path / "config.json")
        model = FastUperNet(config, backend=backend, winograd=winograd)
        files = _weight_files(path)
        entries: dict[str, _Entry] = {}
        for f in files:
            entries.update(_entries(f))
        copy_state_dict(model, entries, strict=strict)
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    return model.eval()


def save(model: FastUperNet, save_directory: str | os.PathLike) -> None:
    from safetensors.torch import save_file

    directory = Path(save_directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.to_json_file(directory / "config.json")
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(directory / SAFE_SINGLE), metadata={"format": "pt"})
