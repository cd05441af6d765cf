"""upernet_fast: a fast, drop-in UPerNet (transformers `UperNetForSemanticSegmentation` compatible)."""

from .checkpoint import CheckpointError
from .config import UperNetConfig
from .model import FastUperNet, load
from .outputs import SemanticSegmenterOutput

__version__ = "0.1.0"
__all__ = ["CheckpointError", "FastUperNet", "SemanticSegmenterOutput", "UperNetConfig", "load"]
