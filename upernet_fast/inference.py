"""Inference pipeline: images in, int64 label maps at each image's original size out.

- `Segmenter`: preprocessing (hub image processor), whole-image or mmseg sliding-window inference, optional
  flip / multi-scale test-time augmentation, batching of same-size images, labels at the original size.
- `slide_inference`: mmseg's `EncoderDecoder.slide_inference`, window for window.
- `labels_at_size`: bilinear resize + argmax in row blocks, so full-resolution logits never exist.

Works with any module whose `forward(pixel_values=...)` returns an object with `.logits` (B, C, H, W) at the
input size (or a tuple whose first item is the logits): `upernet_fast.load(...)` models and transformers'
`UperNetForSemanticSegmentation` alike.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from . import dispatch, preprocess
from .preprocess import ImageInput

EMBEDDED_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "embedded"


def default_model_path() -> Path:
    """Directory of the small embedded model (HF format: config.json + model.safetensors)."""
    return EMBEDDED_MODEL_DIR


def load_model(
    source: str | os.PathLike | nn.Module | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    backend: str | None = None,
    winograd: bool | None = None,
    tune: bool | None = None,
    bf16x3: bool | None = None,
) -> nn.Module:
    """A `FastUperNet` from a HF-format directory / hub id (None = the embedded model), in eval mode; a
    module (e.g. a transformers UperNet) is used as it is. `dtype`: as `upernet_fast.load` ("bfloat16",
    torch.float32, ...; None keeps the checkpoint's)."""
    if isinstance(source, nn.Module):
        return source.eval()
    from .model import load

    source = str(default_model_path() if source is None else source)
    switches = {"backend": backend, "winograd": winograd, "tune": tune, "bf16x3": bf16x3}
    return load(source, device=device, dtype=dtype, **switches)


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next(model.parameters(), None)
    if param is None:
        return torch.device("cpu"), torch.float32
    return param.device, param.dtype if param.dtype.is_floating_point else torch.float32


def forward_logits(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """The model's logits (B, C, H, W) as float32, whatever its device, dtype and output type."""
    device, dtype = _device_dtype(model)
    out = model(pixel_values=pixel_values.to(device=device, dtype=dtype))
    logits = out.logits if hasattr(out, "logits") else out[0]
    return logits.float()


def slide_windows(
    height: int, width: int, crop_size: tuple[int, int], stride: tuple[int, int]
) -> list[tuple[int, int, int, int]]:
    """mmseg's windows (y1, y2, x1, x2): `max(H - crop + stride - 1, 0) // stride + 1` per axis, the last one
    shifted back inside the image. Every window is min(crop, H) x min(crop, W)."""
    (h_crop, w_crop), (h_stride, w_stride) = crop_size, stride
    if min(h_crop, w_crop, h_stride, w_stride) < 1:
        raise ValueError(
            f"crop_size and stride must be positive (height, width), got {crop_size} and {stride}"
        )
    h_grids = max(height - h_crop + h_stride - 1, 0) // h_stride + 1
    w_grids = max(width - w_crop + w_stride - 1, 0) // w_stride + 1
    windows = []
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y2 = min(h_idx * h_stride + h_crop, height)
            x2 = min(w_idx * w_stride + w_crop, width)
            windows.append((max(y2 - h_crop, 0), y2, max(x2 - w_crop, 0), x2))
    return windows


@torch.inference_mode()
def slide_inference(
    model: nn.Module,
    pixel_values: torch.Tensor,
    crop_size: tuple[int, int] = (512, 512),
    stride: tuple[int, int] = (341, 341),
    num_classes: int | None = None,
    batch_size: int = 1,
) -> torch.Tensor:
    """mmseg's sliding-window inference: logits (B, C, H, W), summed over windows / per-pixel window count.

    Windows all have the same size, so up to `batch_size` crops (windows x images) go through one forward.
    The accumulator lives at the input resolution (the processed image), in float32."""
    batch, _, height, width = pixel_values.shape
    if batch == 0:
        raise ValueError("slide_inference got a batch of 0 images")
    windows = slide_windows(height, width, tuple(crop_size), tuple(stride))
    per_call = max(1, batch_size // batch)
    preds: torch.Tensor | None = None
    count = torch.zeros((1, 1, height, width), dtype=torch.float32)
    for start in range(0, len(windows), per_call):
        chunk = windows[start : start + per_call]
        crops = torch.cat([pixel_values[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in chunk])
        logits = forward_logits(model, crops)
        if preds is None:
            channels = logits.shape[1]
            if num_classes is not None and num_classes != channels:
                raise ValueError(f"model returns {channels} classes, num_classes={num_classes}")
            preds = torch.zeros((batch, channels, height, width), dtype=torch.float32, device=logits.device)
            count = count.to(logits.device)
        for k, (y1, y2, x1, x2) in enumerate(chunk):
            preds[:, :, y1:y2, x1:x2] += logits[k * batch : (k + 1) * batch]
            count[:, :, y1:y2, x1:x2] += 1
    return preds.div_(count)


@torch.inference_mode()
def labels_at_size(logits: torch.Tensor, size: tuple[int, int], backend: str | None = None) -> torch.Tensor:
    """argmax over classes of `logits` (C, H, W) or (B, C, H, W) resized bilinearly (align_corners=False) to
    `size` = (height, width): int64 (H', W') or (B, H', W').

    The fused `resize_argmax` op (through `dispatch`, so the Triton kernel on CUDA): the same labels as
    `F.interpolate(logits, size, mode="bilinear").argmax(1)` in bounded memory, never the full-size
    C-channel tensor. (It replaced a slower boundary-pixel shortcut with identical labels:
    bench/results/decisions.md, "labels_at_size".)"""
    x = logits[None] if logits.dim() == 3 else logits
    labels = dispatch.get_op("resize_argmax", backend, x.device)(x, [int(size[0]), int(size[1])])
    return labels[0] if logits.dim() == 3 else labels


@torch.inference_mode()
def probs_at_size(
    scores: torch.Tensor, size: tuple[int, int], softmax: bool = True, block_elements: int = 1 << 22
) -> tuple[torch.Tensor, torch.Tensor]:
    """`scores` (C, h, w) resized bilinearly (align_corners=False, as `F.interpolate`) to `size`, then
    softmax over classes unless they are probabilities already: (labels (H, W) int64, probs (C, H, W)
    float32), both on the CPU.

    Filled in blocks of output rows (about `block_elements` values each): each block blends its two source
    rows, then resizes the width; so the result is the only full-size array (no 2-3 full-size temporaries
    as with `F.interpolate(...).softmax(1)`)."""
    channels, height, width = scores.shape
    out_h, out_w = int(size[0]), int(size[1])
    probs = torch.empty((channels, out_h, out_w), dtype=torch.float32)
    labels = torch.empty((out_h, out_w), dtype=torch.int64)
    scores = scores.float()
    # source row of each output row, as PyTorch computes it: max(scale * (i + 0.5) - 0.5, 0)
    y = ((torch.arange(out_h, dtype=torch.float32) + 0.5) * (height / out_h) - 0.5).clamp_(min=0)
    y0 = y.long().clamp_(max=height - 1)
    y1 = (y0 + 1).clamp_(max=height - 1)
    weight = (y - y0).to(scores.device)
    rows = max(1, block_elements // max(1, channels * out_w))
    for r0 in range(0, out_h, rows):
        r1 = min(out_h, r0 + rows)
        top, bottom = scores[:, y0[r0:r1]], scores[:, y1[r0:r1]]
        block = torch.lerp(top, bottom, weight[r0:r1, None].expand_as(top))
        if out_w != width:  # the height is already final: this resize changes only the width
            block = F.interpolate(block[None], size=(r1 - r0, out_w), mode="bilinear", align_corners=False)[0]
        labels[r0:r1] = block.argmax(0).cpu()
        probs[:, r0:r1] = (block.softmax(0) if softmax else block).cpu()
    return labels, probs


class Segmenter:
    """Semantic segmentation of images: `segmenter(image) -> np.ndarray` (H, W) int64 class indices at the
    image's original size; a list in gives a list out.

    Images: PIL images or file paths (turned upright by their EXIF orientation), arrays (HxW / HxWx3 /
    HxWx4) and tensors (3xHxW or HxWx3) of uint8 or of floats in [0, 1]; grayscale and RGBA become RGB.
    `segmenter(image, return_probs=True)` returns `(labels, probs)`: probs (num_labels, H, W) float32 class
    probabilities at the original size, filled in row blocks (the only full-size array is the result).

    Resolution the network sees ("processed size"):
    - `keep_ratio_short_side=N`: keep-ratio resize so the short side is N (long side capped at
      `max_long_side` if given), as mmseg's `Resize(scale=(2048, 512), keep_ratio=True)`;
    - otherwise, in `mode="whole"`: `size` (default 512x512, the hub image processor); `size=None` = as is;
    - otherwise, in `mode="slide"`: short side `min(crop_size)`, long side at most 4x that (mmseg's ADE20K
      test pipeline: scale (2048, 512) with 512 crops).
    Slide mode accumulates logits at the processed size; only `labels_at_size` goes to the original size.

    TTA: `flip=True` adds the horizontally flipped image, `scales=[0.75, 1.0, 1.25]` resizes the processed
    size by each factor; with TTA the softmax probabilities (resized to the processed size) are averaged.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        size: tuple[int, int] | None = (512, 512),
        keep_ratio_short_side: int | None = None,
        max_long_side: int | None = None,
        mode: str = "whole",
        crop_size: tuple[int, int] = (512, 512),
        stride: tuple[int, int] = (341, 341),
        flip: bool = False,
        scales: Sequence[float] | None = None,
        batch_size: int = 4,
        mean: Sequence[float] = preprocess.IMAGENET_MEAN,
        std: Sequence[float] = preprocess.IMAGENET_STD,
    ) -> None:
        if mode not in ("whole", "slide"):
            raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")
        self.model = model.eval()
        self.mode = mode
        self.size = tuple(size) if size is not None else None
        self.crop_size, self.stride = tuple(crop_size), tuple(stride)
        if mode == "slide" and not keep_ratio_short_side:
            keep_ratio_short_side = min(self.crop_size)
            max_long_side = max_long_side or 4 * keep_ratio_short_side
        self.keep_ratio_short_side, self.max_long_side = keep_ratio_short_side, max_long_side
        self.flip = flip
        self.scales = [float(s) for s in scales] if scales else [1.0]
        self.batch_size = max(1, int(batch_size))
        self.mean, self.std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
        if len(self.mean) != 3 or len(self.std) != 3 or not min(self.std) > 0:
            raise ValueError(
                f"mean and std must be 3 values (R, G, B), std positive; got mean {mean!r}, std {std!r}"
            )

    @classmethod
    def from_pretrained(
        cls,
        source: str | os.PathLike | nn.Module | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        backend: str | None = None,
        winograd: bool | None = None,
        tune: bool | None = None,
        bf16x3: bool | None = None,
        **kwargs,
    ) -> Segmenter:
        """Load a model (None = the embedded one) and take its preprocessing from `preprocessor_config.json`
        when the directory has one (input size; in slide mode the crop is that size, stride 2/3 of it)."""
        switches = {"backend": backend, "winograd": winograd, "tune": tune, "bf16x3": bf16x3}
        model = load_model(source, device=device, dtype=dtype, **switches)
        local = (
            None
            if isinstance(source, nn.Module)
            else Path(str(default_model_path() if source is None else source))
        )
        config = preprocess.read_processor_config(local) if local is not None and local.is_dir() else None
        if config:
            for key in ("size", "mean", "std"):
                if key in config:
                    kwargs.setdefault(key, config[key])
            if config.get("size") and "crop_size" not in kwargs:
                kwargs["crop_size"] = config["size"]
                kwargs.setdefault("stride", tuple(s * 2 // 3 for s in config["size"]))
        return cls(model, **kwargs)

    @property
    def id2label(self) -> dict[int, str]:
        config = getattr(self.model, "config", None)
        labels = getattr(config, "id2label", None) or {}
        return {int(k): str(v) for k, v in labels.items()}

    def processed_size(self, height: int, width: int) -> tuple[int, int]:
        return preprocess.processed_size(
            height,
            width,
            size=self.size,
            keep_ratio_short_side=self.keep_ratio_short_side,
            max_long_side=self.max_long_side,
        )

    def __call__(self, images: ImageInput | Sequence[ImageInput], return_probs: bool = False) -> Any:
        """Label maps (H, W) int64; with `return_probs`, `(labels, probs)` pairs, probs (C, H, W) float32.
        One image in gives one result; a list or tuple gives a list."""
        single = not isinstance(images, (list, tuple))
        items = [images] if single else list(images)
        results: list[Any] = []
        for start in range(0, len(items), self.batch_size):  # bounded memory for long lists
            loaded = [preprocess.load_image(x) for x in items[start : start + self.batch_size]]
            if return_probs:
                results.extend((lab.numpy(), prob.numpy()) for lab, prob in self.predict_probs(loaded))
            else:
                results.extend(label.numpy() for label in self.predict_labels(loaded))
        return results[0] if single else results

    def predict_labels(self, images: Sequence[Image.Image]) -> list[torch.Tensor]:
        """int64 label maps at each (RGB PIL) image's size; images of the same processed size share batches."""
        backend = getattr(self.model, "backend", None)
        return self._predict(images, lambda scores, size: labels_at_size(scores, size, backend).cpu())

    def predict_probs(self, images: Sequence[Image.Image]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(labels (H, W) int64, probabilities (C, H, W) float32) at each (RGB PIL) image's size."""
        tta = len(self.scales) > 1 or self.flip  # TTA scores are probabilities already
        return self._predict(images, lambda scores, size: probs_at_size(scores, size, softmax=not tta))

    def _predict(self, images: Sequence[Image.Image], finish: Any) -> list[Any]:
        """`finish(scores (C, h, w) at the processed size, original size)` per image; images of the same
        processed size share batches."""
        groups: dict[tuple[int, int], list[int]] = {}
        stride = int(getattr(getattr(self.model, "backbone", None), "reduction", 0) or 0)  # ours: 32
        for i, image in enumerate(images):
            proc = self.processed_size(image.height, image.width)
            if min(proc) * min(self.scales) < stride:  # the model would name the resized size only
                raise ValueError(
                    f"image of {image.height}x{image.width} becomes {proc[0]}x{proc[1]} after preprocessing"
                    + (f" (x{min(self.scales):g})" if min(self.scales) != 1.0 else "")
                    + f"; each side must be at least {stride} pixels, the model's total stride"
                )
            groups.setdefault(proc, []).append(i)
        out: list[Any] = [None] * len(images)
        for proc, indices in groups.items():
            for s in range(0, len(indices), self.batch_size):
                chunk = indices[s : s + self.batch_size]
                scores = self.predict_scores([images[i] for i in chunk], proc)
                for k, i in enumerate(chunk):
                    out[i] = finish(scores[k], (images[i].height, images[i].width))
        return out

    @torch.inference_mode()
    def predict_scores(self, images: Sequence[Image.Image], size: tuple[int, int]) -> torch.Tensor:
        """(B, C, h, w) at the processed `size`: raw logits, or averaged softmax probabilities under TTA."""
        tta = len(self.scales) > 1 or self.flip
        total: torch.Tensor | None = None
        runs = 0
        for scale in self.scales:
            scaled = size if scale == 1.0 else (int(size[0] * scale + 0.5), int(size[1] * scale + 0.5))
            pixel_values = torch.stack(
                [preprocess.normalize(preprocess.resize(im, scaled), self.mean, self.std) for im in images]
            )
            for flipped in (False, True) if self.flip else (False,):
                scores = self._infer(pixel_values.flip(-1) if flipped else pixel_values)
                scores = scores.flip(-1) if flipped else scores
                if tta:
                    if scores.shape[-2:] != size:
                        scores = F.interpolate(scores, size=size, mode="bilinear", align_corners=False)
                    scores = scores.softmax(1)
                total = scores if total is None else total.add_(scores)
                runs += 1
        return total.div_(runs) if tta else total

    def _infer(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.mode == "slide":
            return slide_inference(
                self.model, pixel_values, self.crop_size, self.stride, batch_size=self.batch_size
            )
        return torch.cat(
            [
                forward_logits(self.model, pixel_values[i : i + self.batch_size])
                for i in range(0, len(pixel_values), self.batch_size)
            ]
        )


def segment(
    images: ImageInput | Sequence[ImageInput], model: str | os.PathLike | nn.Module | None = None, **kwargs
) -> np.ndarray | list[np.ndarray]:
    """One-call convenience: `Segmenter.from_pretrained(model, **kwargs)(images)`."""
    if isinstance(model, nn.Module):
        return Segmenter(model, **kwargs)(images)
    return Segmenter.from_pretrained(model, **kwargs)(images)


__all__ = [
    "Segmenter",
    "default_model_path",
    "forward_logits",
    "labels_at_size",
    "load_model",
    "probs_at_size",
    "segment",
    "slide_inference",
    "slide_windows",
]
