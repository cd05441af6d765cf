"""UperNet configuration: the fields of transformers' `UperNetConfig`, read from plain dicts.

The raw dict is kept so `save_pretrained` writes back what it read (transformers then loads it unchanged);
missing fields take transformers' defaults, kept here in one place.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any

HEAD_DEFAULTS: dict[str, Any] = {
    "hidden_size": 512,
    "initializer_range": 0.02,
    "pool_scales": [1, 2, 3, 6],
    "use_auxiliary_head": True,
    "auxiliary_loss_weight": 0.4,
    "auxiliary_in_channels": None,
    "auxiliary_channels": 256,
    "auxiliary_num_convs": 1,
    "auxiliary_concat_input": False,
    "loss_ignore_index": 255,
    "output_hidden_states": False,
    "output_attentions": False,
    "return_dict": True,
}

AUXILIARY_LEVEL = 2  # transformers' UperNetFCNHead in_index: the backbone level the auxiliary head reads

# transformers' UperNetConfig falls back to a ResNet backbone with all four stages.
DEFAULT_BACKBONE_CONFIG: dict[str, Any] = {
    "model_type": "resnet",
    "out_features": ["stage1", "stage2", "stage3", "stage4"],
}


class UperNetConfig:
    """Attribute access to an UperNet config dict (HF-compatible names)."""

    model_type = "upernet"

    def __init__(self, config: dict[str, Any] | None = None, **overrides: Any) -> None:
        if config is not None and not isinstance(config, dict):
            raise TypeError(f"an UperNet config must be a JSON object (dict), got {type(config).__name__}")
        raw = copy.deepcopy(dict(config or {}))
        raw.update(overrides)
        if raw.get("model_type", "upernet") != "upernet":
            raise ValueError(
                f"config model_type is {raw['model_type']!r}; expected 'upernet' "
                "(a UperNetForSemanticSegmentation config.json)"
            )
        raw["model_type"] = "upernet"
        self._raw = raw
        for key, default in HEAD_DEFAULTS.items():
            setattr(self, key, copy.deepcopy(raw.get(key, default)))
        self.pool_scales = [int(s) for s in self.pool_scales]
        self.backbone_config = self._backbone_config(raw)
        self.id2label, self.label2id = self._labels(raw)
        self._check_sizes()

    def _check_sizes(self) -> None:
        """Sizes that would otherwise fail deep inside torch (a negative dimension) or index past a list."""
        sizes = {"hidden_size": self.hidden_size, "auxiliary_channels": self.auxiliary_channels}
        for name, value in sizes.items():
            if not (isinstance(value, int) and value > 0):
                raise ValueError(f"config {name} must be a positive integer, got {value!r}")
        if not self.pool_scales or min(self.pool_scales) < 1:
            raise ValueError(f"config pool_scales must be positive integers, got {self.pool_scales}")
        levels = len(self.backbone_config.get("out_features") or DEFAULT_BACKBONE_CONFIG["out_features"])
        if self.use_auxiliary_head and self.auxiliary_in_channels is None and levels <= AUXILIARY_LEVEL:
            raise ValueError(  # transformers fails here too (an IndexError building its auxiliary head)
                f"the auxiliary head reads backbone level {AUXILIARY_LEVEL}, but out_features gives {levels} "
                "level(s); set use_auxiliary_head false (or auxiliary_in_channels), or add stages"
            )

    @staticmethod
    def _backbone_config(raw: dict[str, Any]) -> dict[str, Any]:
        backbone_config = raw.get("backbone_config")
        if backbone_config is None:
            if raw.get("backbone") is not None:
                raise ValueError(
                    f"config names a pretrained backbone ({raw['backbone']!r}) instead of giving a "
                    "'backbone_config'; upernet_fast needs the backbone_config dict (as in hub UperNet configs)"
                )
            return copy.deepcopy(DEFAULT_BACKBONE_CONFIG)
        if not isinstance(backbone_config, dict):
            to_dict = getattr(backbone_config, "to_dict", None)
            if to_dict is None:
                raise TypeError(f"backbone_config must be a dict, got {type(backbone_config).__name__}")
            backbone_config = to_dict()
        if "model_type" not in backbone_config:
            raise ValueError(
                "backbone_config has no 'model_type'; expected e.g. 'convnext', 'swin' or 'resnet'"
            )
        return copy.deepcopy(backbone_config)

    @staticmethod
    def _labels(raw: dict[str, Any]) -> tuple[dict[int, str], dict[str, int]]:
        id2label = raw.get("id2label")
        if id2label is None:
            num_labels = int(raw.get("num_labels", 2))
            id2label = {i: f"LABEL_{i}" for i in range(num_labels)}
        id2label = {int(k): str(v) for k, v in id2label.items()}
        if sorted(id2label) != list(range(len(id2label))):
            raise ValueError(f"id2label keys must be 0..N-1, got {sorted(id2label)[:10]}...")
        return id2label, {v: k for k, v in id2label.items()}

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    def to_dict(self) -> dict[str, Any]:
        out = copy.deepcopy(self._raw)
        for key in HEAD_DEFAULTS:
            out[key] = copy.deepcopy(getattr(self, key))
        out["backbone_config"] = copy.deepcopy(self.backbone_config)
        out["id2label"] = {str(k): v for k, v in self.id2label.items()}
        out["label2id"] = {v: k for k, v in self.id2label.items()}
        out.pop("num_labels", None)
        out["model_type"] = "upernet"
        out.setdefault("architectures", ["UperNetForSemanticSegmentation"])
        return out

    def to_json_file(self, path: str | os.PathLike, dtype: Any = None) -> None:
        """`dtype`: the weights' torch dtype, written as transformers does (`"dtype": "bfloat16"`, replacing
        the older spelling `torch_dtype`, which must not contradict it)."""
        raw = self.to_dict()
        if dtype is not None:
            raw.pop("torch_dtype", None)
            raw["dtype"] = str(dtype).removeprefix("torch.")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(raw, f, indent=2, sort_keys=True)
            f.write("\n")

    @classmethod
    def from_any(cls, config: Any) -> UperNetConfig:
        """A dict, a path to config.json (or its directory), a transformers config, or an UperNetConfig."""
        if isinstance(config, UperNetConfig):
            return cls(config.to_dict())
        if isinstance(config, dict):
            return cls(config)
        if isinstance(config, (str, os.PathLike)):
            path = os.fspath(config)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            try:
                with open(path, encoding="utf-8") as f:
                    return cls(json.load(f))
            except FileNotFoundError:
                raise FileNotFoundError(f"no config file at {path}") from None
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not valid JSON: {e}") from None
        to_dict = getattr(config, "to_dict", None)
        if to_dict is not None:
            return cls(to_dict())
        raise TypeError(f"cannot build an UperNet config from {type(config).__name__}")

    def __repr__(self) -> str:
        bb = self.backbone_config.get("model_type")
        return (
            f"UperNetConfig(backbone={bb}, hidden_size={self.hidden_size}, "
            f"pool_scales={self.pool_scales}, num_labels={self.num_labels})"
        )
