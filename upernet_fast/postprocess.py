"""`post_process_semantic_segmentation`: the image processor's post-processing of the hub UperNet
checkpoints (transformers' `SegformerImageProcessor`), so code written against it keeps working."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["post_process_semantic_segmentation"]


def _logits(outputs: Any) -> torch.Tensor:
    if isinstance(outputs, torch.Tensor):
        return outputs
    if hasattr(outputs, "logits"):
        return outputs.logits
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]  # return_dict=False: (logits, ...)
    raise TypeError(f"expected model outputs with .logits, a tuple or a tensor, got {type(outputs).__name__}")


def post_process_semantic_segmentation(
    outputs: Any, target_sizes: Sequence[tuple[int, int]] | torch.Tensor | None = None
) -> list[torch.Tensor]:
    """One int64 (H, W) label map per batch item, as transformers' image processor returns them: each item's
    logits resized (bilinear, align_corners=False) to its `target_sizes[i]` = (height, width), then the
    argmax over classes; without `target_sizes`, the argmax at the logits' size.

    `outputs`: a model output with `.logits` (B, C, h, w), a tuple whose first item is the logits, or the
    logits tensor itself."""
    logits = _logits(outputs)
    if logits.dim() != 4:
        raise ValueError(f"logits must have shape (batch, classes, height, width), got {tuple(logits.shape)}")
    if target_sizes is None:
        labels = logits.argmax(dim=1)
        return [labels[i] for i in range(labels.shape[0])]
    if isinstance(target_sizes, torch.Tensor):
        target_sizes = target_sizes.tolist()
    if len(target_sizes) != len(logits):
        raise ValueError(
            f"got {len(target_sizes)} target sizes for a batch of {len(logits)}; pass one (height, width) per image"
        )
    maps = []
    for item, size in zip(logits, target_sizes, strict=True):
        if len(size) != 2 or min(int(size[0]), int(size[1])) < 1:
            raise ValueError(f"target sizes must be (height, width) of at least 1 each, got {list(size)}")
        resized = F.interpolate(
            item[None], size=(int(size[0]), int(size[1])), mode="bilinear", align_corners=False
        )
        maps.append(resized[0].argmax(dim=0))
    return maps
