"""Output type: transformers' `SemanticSegmenterOutput` when transformers imports, else a look-alike."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, fields
from typing import Any

import torch

try:  # transformers is optional at run time
    from transformers.modeling_outputs import SemanticSegmenterOutput
except Exception:  # noqa: BLE001 - any import failure means "not available"

    @dataclass
    class SemanticSegmenterOutput(OrderedDict):  # type: ignore[no-redef]
        """Same fields as transformers' class; attribute, key and index access (None fields skipped)."""

        loss: torch.Tensor | None = None
        logits: torch.Tensor | None = None
        hidden_states: tuple[torch.Tensor, ...] | None = None
        attentions: tuple[torch.Tensor, ...] | None = None

        def __post_init__(self) -> None:
            for f in fields(self):
                value = getattr(self, f.name)
                if value is not None:
                    OrderedDict.__setitem__(self, f.name, value)

        def __getitem__(self, key: Any) -> Any:
            if isinstance(key, str):
                return OrderedDict.__getitem__(self, key)
            return self.to_tuple()[key]

        def to_tuple(self) -> tuple[Any, ...]:
            return tuple(self[k] for k in self.keys())


__all__ = ["SemanticSegmenterOutput"]
