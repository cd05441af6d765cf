"""Image preprocessing identical to the hub checkpoints' image processor.

The `openmmlab/upernet-*` checkpoints were converted with `SegformerImageProcessor()` at its defaults (see
transformers' `convert_*_upernet_to_pytorch.py`): resize to 512x512 with PIL's BILINEAR filter (which
antialiases when shrinking), rescale by 1/255, normalise with the ImageNet mean/std. transformers 5 serves
that config with `SegformerImageProcessorPil` (without torchvision) or the torchvision `SegformerImageProcessor`.
We reproduce the PIL path bit for bit: PIL resize on uint8, then `float32(float64(x) * (1/255))`, then
`(x - mean) / std` in float32; the last two steps are a 256-entry lookup table per channel (exact, and no
float64 copy of a large photo).

Images are converted to RGB as transformers' `convert_to_rgb` does: transparency is composited onto white.
Files and PIL images are turned upright by their EXIF orientation first (`PIL.ImageOps.exif_transpose`, as
transformers' `load_image` does), so a phone photo's label map has the size the photo is shown at.
"""

from __future__ import annotations

import json
import operator
import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
RESCALE_FACTOR = 1 / 255

ImageInput = Image.Image | np.ndarray | torch.Tensor | str | os.PathLike


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB version of a PIL image of any mode (alpha composited onto white). Integer modes "I;16*" and "I"
    (how Pillow holds 16-bit PNG/TIFF data) are 16-bit levels, scaled to 8 bits by the mode, never by the
    values (a dark 16-bit image stays dark); float mode "F" holds values in [0, 1] like float arrays."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(image, dtype=np.float64)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise ValueError(
                f"integer (mode {image.mode}) images must hold 16-bit levels 0-65535, "
                f"got range [{arr.min():g}, {arr.max():g}]"
            )
        image = Image.fromarray((arr / 257.0 + 0.5).astype(np.uint8))
    elif image.mode == "F":
        image = Image.fromarray(_float_to_uint8(np.asarray(image)))
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def upright(image: Image.Image, in_place: bool = False) -> Image.Image:
    """`image` rotated/flipped as its EXIF orientation says (itself when there is nothing to do)."""
    if image.getexif().get(ExifTags.Base.Orientation, 1) in (1, None):
        return image
    if in_place:
        ImageOps.exif_transpose(image, in_place=True)
        return image
    return ImageOps.exif_transpose(image)


def _float_to_uint8(arr: np.ndarray) -> np.ndarray:
    """Float pixels in [0, 1] -> uint8, rounded to the nearest level (the reverse of x / 255)."""
    if arr.size:
        if np.isnan(arr).any():
            raise ValueError(
                f"float images must not hold NaN, got {int(np.isnan(arr).sum())} NaN pixel value(s)"
            )
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(
                f"float images must hold values in [0, 1], got range [{lo:g}, {hi:g}]"
                " (pass uint8 for 0-255 images, and raw, not normalised, pixels)"
            )
    return (arr.astype(np.float32) * 255.0 + 0.5).astype(np.uint8)


def _tensor_to_array(tensor: torch.Tensor) -> np.ndarray:
    """An image tensor (3xHxW / 1xHxW / 4xHxW channels-first, or HxWxC, or HxW) as an HxW[xC] array."""
    t = tensor.detach().cpu()
    if t.dim() == 3 and t.shape[0] in (1, 3, 4) and not (t.shape[2] in (1, 3, 4) and t.shape[0] > t.shape[2]):
        t = t.permute(1, 2, 0)  # channels first, torchvision's layout (ties such as 3xHx3 read as CHW)
    elif not (t.dim() == 2 or (t.dim() == 3 and t.shape[2] in (1, 3, 4))):
        raise ValueError(
            f"expected an image tensor of shape 3xHxW or HxWx3 (also 1 or 4 channels, or HxW), got {tuple(t.shape)}"
        )
    if t.dtype == torch.uint8:
        return t.numpy()
    if t.is_floating_point():
        return t.float().numpy()
    raise TypeError(f"image tensors must be uint8 or float in [0, 1], got {t.dtype}")


def load_image(source: ImageInput) -> Image.Image:
    """An RGB PIL image from a PIL image or a file path (both turned upright by their EXIF orientation), an
    array (HxW, HxWx1, HxWx3, HxWx4; uint8, or float in [0, 1]) or a tensor (3xHxW or HxWx3, also 1 or 4
    channels; uint8, or float in [0, 1]). Floats are rounded to 8 bits, which is what the resize sees.

    Raises `OSError`/`ValueError` for unreadable files, `TypeError`/`ValueError` for unsupported arrays."""
    image = _load_any(source)
    if image.width == 0 or image.height == 0:
        raise ValueError(f"image of {image.height}x{image.width} pixels has nothing to segment")
    return image


def _load_any(source: ImageInput) -> Image.Image:
    if isinstance(source, Image.Image):
        return to_rgb(upright(source))
    if isinstance(source, torch.Tensor):
        source = _tensor_to_array(source)
    if isinstance(source, np.ndarray):
        if source.dtype.kind == "f":
            source = _float_to_uint8(source)
        elif source.dtype != np.uint8:
            raise TypeError(f"image arrays must be uint8, or float in [0, 1], got {source.dtype}")
        if source.ndim == 3 and source.shape[2] == 1:
            source = source[..., 0]
        if source.ndim == 2 or (source.ndim == 3 and source.shape[2] in (3, 4)):
            return to_rgb(Image.fromarray(np.ascontiguousarray(source)))  # L, RGB or RGBA by shape
        raise ValueError(f"expected an HxW, HxWx1, HxWx3 or HxWx4 array, got shape {source.shape}")
    if isinstance(source, (str, os.PathLike)):
        with Image.open(source) as im:
            im.load()  # decode now: truncated files fail here, with the file still named by the caller
            return to_rgb(upright(im, in_place=True))
    raise TypeError(f"unsupported image type {type(source).__name__}")


def parse_size(size: str | tuple[int, int]) -> tuple[int, int]:
    """(height, width) from ``"HxW"`` (e.g. ``"512x683"``, any case) or a pair of integers; ValueError
    unless both are positive integers. The one parser of sizes the CLI and the ONNX export take."""
    try:
        if isinstance(size, str):
            h, w = (int(v) for v in size.strip().lower().split("x"))
        else:
            h, w = (operator.index(v) for v in size)  # ints, numpy integers; not floats
    except (TypeError, ValueError):
        raise ValueError(f"expected a size HxW, e.g. 512x683, got {size!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"sizes must be positive, got {size!r}")
    return h, w


def keep_ratio_size(
    height: int, width: int, short_side: int, max_long_side: int | None = None
) -> tuple[int, int]:
    """mmcv's `rescale_size` (mmseg `Resize(keep_ratio=True)`): scale so the short side is `short_side`
    and, if given, the long side at most `max_long_side`; sizes rounded half up."""
    factor = short_side / min(height, width)
    if max_long_side is not None:
        factor = min(factor, max_long_side / max(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def resize(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """PIL BILINEAR resize to (height, width), as the hub image processor does (antialiased when shrinking)."""
    height, width = size
    if image.size == (width, height):
        return image
    return image.resize((width, height), Image.BILINEAR)


@lru_cache(maxsize=8)
def _lookup_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(3, 256) float32: the normalised value of every uint8 level, computed in transformers' op order."""
    levels = (np.arange(256, dtype=np.float64) * RESCALE_FACTOR).astype(np.float32)
    mean32, std32 = np.asarray(mean, dtype=np.float32), np.asarray(std, dtype=np.float32)
    return (levels[None, :] - mean32[:, None]) / std32[:, None]


def normalize(
    image: Image.Image | np.ndarray,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """uint8 RGB (PIL or HxWx3 array) -> float32 tensor (3, H, W): rescale 1/255, then (x - mean) / std."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"normalize expects HxWx3 uint8, got {arr.dtype} {arr.shape}")
    lut = _lookup_table(tuple(float(m) for m in mean), tuple(float(s) for s in std))
    out = np.empty((3, arr.shape[0], arr.shape[1]), dtype=np.float32)
    for c in range(3):
        np.take(lut[c], arr[..., c], out=out[c])
    return torch.from_numpy(out)


def processed_size(
    height: int,
    width: int,
    *,
    size: tuple[int, int] | None = (512, 512),
    keep_ratio_short_side: int | None = None,
    max_long_side: int | None = None,
) -> tuple[int, int]:
    """The (height, width) the network sees: keep-ratio short-side resize if given, else `size`, else as is."""
    if keep_ratio_short_side:
        return keep_ratio_size(height, width, keep_ratio_short_side, max_long_side)
    if size is not None:
        return int(size[0]), int(size[1])
    return height, width


def preprocess(
    images: ImageInput | Sequence[ImageInput],
    *,
    size: tuple[int, int] | None = (512, 512),
    keep_ratio_short_side: int | None = None,
    max_long_side: int | None = None,
) -> torch.Tensor:
    """`pixel_values` (B, 3, H, W) for one image or a list; all must reach the same processed size.

    With the defaults this equals `SegformerImageProcessor()(images).pixel_values` (the hub checkpoints)."""
    items = list(images) if isinstance(images, (list, tuple)) else [images]
    tensors = []
    for item in items:
        image = load_image(item)
        target = processed_size(
            image.height,
            image.width,
            size=size,
            keep_ratio_short_side=keep_ratio_short_side,
            max_long_side=max_long_side,
        )
        tensors.append(normalize(resize(image, target)))
    return torch.stack(tensors)


def processor_config(size: tuple[int, int]) -> dict:
    """A `preprocessor_config.json` (SegformerImageProcessor format) for a model trained at `size`."""
    return {
        "image_processor_type": "SegformerImageProcessor",
        "do_resize": True,
        "size": {"height": int(size[0]), "width": int(size[1])},
        "resample": 2,  # PIL BILINEAR
        "do_rescale": True,
        "rescale_factor": RESCALE_FACTOR,
        "do_normalize": True,
        "image_mean": list(IMAGENET_MEAN),
        "image_std": list(IMAGENET_STD),
        "do_reduce_labels": False,
    }


def read_processor_config(model_dir: str | os.PathLike) -> dict | None:
    """The resize size and mean/std from a model directory's `preprocessor_config.json`, if there is one."""
    path = Path(model_dir) / "preprocessor_config.json"
    if not path.is_file():
        return None
    raw = json.loads(path.read_text())
    out: dict = {}
    size = raw.get("size")
    if isinstance(size, dict) and "height" in size and "width" in size:
        out["size"] = (int(size["height"]), int(size["width"]))
    elif isinstance(size, int):
        out["size"] = (size, size)
    if raw.get("do_resize") is False:
        out["size"] = None
    if raw.get("do_normalize", True):
        out["mean"] = tuple(raw.get("image_mean", IMAGENET_MEAN))
        out["std"] = tuple(raw.get("image_std", IMAGENET_STD))
    else:
        out["mean"], out["std"] = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return out
