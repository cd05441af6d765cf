"""Colours, label PNGs and overlays.

ADE20K (150 classes) uses mmsegmentation's ADE20K palette and class names; any other label count uses a fixed
20-colour palette (matplotlib's tab20 order), continued with the PASCAL VOC colour map beyond 20 classes.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# fmt: off
ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand",
    "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge",
    "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove",
    "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle",
    "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything",
    "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven",
    "ball", "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake",
    "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray",
    "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator",
    "glass", "clock", "flag",
)

ADE20K_PALETTE: tuple[tuple[int, int, int], ...] = (
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3), (120, 120, 80),
    (140, 140, 140), (204, 5, 255), (230, 230, 230), (4, 250, 7), (224, 5, 255), (235, 255, 7),
    (150, 5, 61), (120, 120, 70), (8, 255, 51), (255, 6, 82), (143, 255, 140), (204, 255, 4),
    (255, 51, 7), (204, 70, 3), (0, 102, 200), (61, 230, 250), (255, 6, 51), (11, 102, 255),
    (255, 7, 71), (255, 9, 224), (9, 7, 230), (220, 220, 220), (255, 9, 92), (112, 9, 255),
    (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10), (7, 255, 255),
    (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7), (255, 122, 8), (0, 255, 20),
    (255, 8, 41), (255, 5, 153), (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255),
    (140, 140, 140), (250, 10, 15), (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0),
    (153, 255, 0), (0, 0, 255), (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255),
    (11, 200, 200), (255, 82, 0), (0, 255, 245), (0, 61, 255), (0, 255, 112), (0, 255, 133),
    (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0), (0, 143, 255), (51, 255, 0),
    (0, 82, 255), (0, 255, 41), (0, 255, 173), (10, 0, 255), (173, 255, 0), (0, 255, 153),
    (255, 92, 0), (255, 0, 255), (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20),
    (255, 184, 184), (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194),
    (0, 255, 82), (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255), (0, 122, 255),
    (0, 255, 163), (255, 153, 0), (0, 255, 10), (255, 112, 0), (143, 255, 0), (82, 0, 255),
    (163, 255, 0), (255, 235, 0), (8, 184, 170), (133, 0, 255), (0, 255, 92), (184, 0, 255),
    (255, 0, 31), (0, 184, 255), (0, 214, 255), (255, 0, 112), (92, 255, 0), (0, 224, 255),
    (112, 224, 255), (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0), (255, 0, 163),
    (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235), (245, 0, 255),
    (255, 0, 122), (255, 245, 0), (10, 190, 212), (214, 255, 0), (0, 204, 255), (20, 0, 255),
    (255, 255, 0), (0, 153, 255), (0, 41, 255), (0, 255, 204), (41, 0, 255), (41, 255, 0),
    (173, 0, 255), (0, 245, 255), (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255),
    (184, 255, 0), (0, 133, 255), (255, 214, 0), (25, 194, 194), (102, 255, 0), (92, 0, 255),
)
# fmt: on


def voc_palette(n: int) -> np.ndarray:
    """PASCAL VOC colour map: index bits spread over the high bits of R, G, B. (n, 3) uint8."""
    out = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        out[i] = (r, g, b)
    return out


# matplotlib's tab10 then its light tab20 partners: bright, distinct, readable when blended with a photo.
FIXED_PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
    (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213),
    (196, 156, 148), (247, 182, 210), (199, 199, 199), (219, 219, 141), (158, 218, 229),
)  # fmt: skip


def palette_for(num_labels: int) -> np.ndarray:
    """(num_labels, 3) uint8: ADE20K's for 150 classes; otherwise the fixed palette (20 colours), continued
    with the VOC colour map beyond that."""
    if num_labels == len(ADE20K_PALETTE):
        return np.asarray(ADE20K_PALETTE, dtype=np.uint8)
    fixed = np.asarray(FIXED_PALETTE, dtype=np.uint8)
    if num_labels <= len(fixed):
        return fixed[:num_labels].copy()
    return np.concatenate([fixed, voc_palette(num_labels)[len(fixed) :]])


def label_image(labels: np.ndarray, palette: np.ndarray) -> Image.Image:
    """Label map -> PNG-ready image whose pixel values are the class indices.

    Palette ("P") mode when there are at most 256 classes (viewers show colours, readers get indices);
    16-bit grayscale ("I;16") beyond that."""
    labels = np.asarray(labels)
    if len(palette) <= 256:
        image = Image.fromarray(labels.astype(np.uint8))  # "L"; putpalette makes it "P"
        flat = np.zeros((256, 3), dtype=np.uint8)
        flat[: len(palette)] = palette
        image.putpalette(flat.ravel().tolist())
        return image
    return Image.fromarray(labels.astype(np.uint16))  # "I;16"


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # scalable default font (Pillow >= 10.1)
    except TypeError:
        return ImageFont.load_default()


def overlay(
    image: Image.Image,
    labels: np.ndarray,
    palette: np.ndarray,
    id2label: Mapping[int, str] | None = None,
    alpha: float = 0.5,
    legend: bool = True,
    strip_pixels: int = 1 << 18,
) -> Image.Image:
    """The image blended with the class colours, plus (right) a legend of the classes present, largest first.

    Blended in strips of about `strip_pixels` pixels straight into the output canvas: a float copy of a
    6000x4000 photo would be 288 MB per temporary, and the blend makes several."""
    labels = np.asarray(labels)
    height, width = labels.shape
    if (image.height, image.width) != (height, width):
        raise ValueError(f"image is {image.height}x{image.width}, labels {height}x{width}")
    entries: list[tuple[int, str]] = []
    panel_w = 0
    rows = max(1, strip_pixels // max(1, width))
    if legend:
        counts = np.zeros(len(palette), dtype=np.int64)
        for y0 in range(0, height, rows):  # by strips: bincount copies its input as int64
            counts += np.bincount(labels[y0 : y0 + rows].ravel(), minlength=len(palette))[: len(palette)]
        present = [int(i) for i in np.argsort(-counts, kind="stable") if counts[i] > 0]
        id2label = id2label or {}
        font_size = max(10, min(24, height // 24))
        font = _font(font_size)
        pad, swatch, line = font_size // 2, font_size, int(font_size * 1.5)
        entries = [
            (i, f"{i}: {id2label.get(i, f'class {i}')} ({100.0 * counts[i] / counts.sum():.1f}%)")
            for i in present
        ]
        measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        text_w = max((measure.textlength(t, font=font) for _, t in entries), default=0)
        panel_w = int(pad * 3 + swatch + text_w)
        canvas_h = max(height, pad * 2 + line * len(entries))
    else:
        canvas_h = height
    canvas = Image.new("RGB", (width + panel_w, canvas_h), (255, 255, 255))
    for y0 in range(0, height, rows):
        y1 = min(height, y0 + rows)
        rgb = np.asarray(image.crop((0, y0, width, y1)).convert("RGB"), dtype=np.float32)
        colours = palette[labels[y0:y1]].astype(np.float32)
        blended = np.clip((1 - alpha) * rgb + alpha * colours + 0.5, 0, 255).astype(np.uint8)
        canvas.paste(Image.fromarray(blended), (0, y0))
    if legend:
        draw = ImageDraw.Draw(canvas)
        for row, (cls, text) in enumerate(entries):
            x, y = width + pad, pad + row * line
            draw.rectangle(
                [x, y, x + swatch, y + swatch], fill=tuple(int(c) for c in palette[cls]), outline=(0, 0, 0)
            )
            draw.text((x + swatch + pad, y), text, fill=(0, 0, 0), font=font)
    return canvas
