"""upernet_fast: a fast, drop-in UPerNet (transformers `UperNetForSemanticSegmentation` compatible)."""

from __future__ import annotations

import importlib
from typing import Any

from .checkpoint import CheckpointError
from .config import UperNetConfig
from .kernels._memory import empty_cache, keep_freed_memory
from .model import FastUperNet, load
from .outputs import SemanticSegmenterOutput
from .postprocess import post_process_semantic_segmentation

__version__ = "0.1.0"
__all__ = [
    "CheckpointError",
    "FastUperNet",
    "Segmenter",
    "SemanticSegmenterOutput",
    "UperNetConfig",
    "empty_cache",
    "export_onnx",
    "keep_freed_memory",
    "load",
    "ort_session",
    "post_process_semantic_segmentation",
    "slide_inference",
]

# Imported on first use: the pipeline pulls in PIL, the exporter torch.onnx.
_LAZY = {
    "Segmenter": "inference",
    "slide_inference": "inference",
    "export_onnx": "onnx_export",
    "ort_session": "onnx_export",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
