"""Procedural segmentation data: shapes and textures in random colours on cluttered backgrounds.

Used to train and test the small embedded model (`upernet_fast/assets/embedded/`). Every colour is random,
so a model must recognise shape (circle / rectangle / triangle) and texture (stripes / checker), not colour.
Everything is deterministic: sample `i` of seed `s` depends only on `(s, i, size)`.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

CLASSES: tuple[str, ...] = ("background", "circle", "rectangle", "triangle", "stripes", "checker")
BACKGROUND, CIRCLE, RECTANGLE, TRIANGLE, STRIPES, CHECKER = range(len(CLASSES))


def _smooth_field(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Low-frequency random colour field (the background's base), float HxWx3 in [0, 255]."""
    grid = rng.integers(0, 256, size=(rng.integers(2, 5), rng.integers(2, 5), 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(grid).resize((w, h), Image.BICUBIC), dtype=np.float32)


def _clutter(rng: np.random.Generator, canvas: Image.Image, scale: float) -> None:
    """Thin lines, small dots and short scribbles: background that is not any object class."""
    draw = ImageDraw.Draw(canvas)
    w, h = canvas.size
    for _ in range(rng.integers(3, 12)):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = rng.integers(3)
        x, y = float(rng.uniform(0, w)), float(rng.uniform(0, h))
        if kind == 0:  # long thin line
            angle, length = rng.uniform(0, math.pi), rng.uniform(0.2, 0.8) * scale
            end = (x + length * math.cos(angle), y + length * math.sin(angle))
            draw.line([(x, y), end], fill=colour, width=int(rng.integers(1, 3)))
        elif kind == 1:  # small dot: far below the smallest circle
            r = rng.uniform(0.5, 0.025 * scale + 1)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
        else:  # scribble
            pts = [(x, y)]
            for _ in range(rng.integers(2, 6)):
                pts.append(
                    (pts[-1][0] + rng.normal(0, 0.06 * scale), pts[-1][1] + rng.normal(0, 0.06 * scale))
                )
            draw.line(pts, fill=colour, width=1)


def _contrasting_colour(rng: np.random.Generator, against: np.ndarray, min_dist: float = 120.0) -> np.ndarray:
    """A random colour far enough (L1) from `against`, so shapes stay visible."""
    for _ in range(20):
        colour = rng.integers(0, 256, 3).astype(np.float32)
        if np.abs(colour - against).sum() >= min_dist:
            return colour
    return 255.0 - against


def _region_mask(rng: np.random.Generator, h: int, w: int, cx: float, cy: float, r: float) -> np.ndarray:
    """A random blob (ellipse or irregular polygon) that carries a texture class."""
    mask = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask)
    if rng.random() < 0.5:
        rx, ry = r * rng.uniform(0.7, 1.3), r * rng.uniform(0.7, 1.3)
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=1)
    else:
        n = int(rng.integers(5, 9))
        angles = np.sort(rng.uniform(0, 2 * math.pi, n))
        radii = r * rng.uniform(0.7, 1.3, n)
        draw.polygon([(cx + a * math.cos(t), cy + a * math.sin(t)) for a, t in zip(radii, angles)], fill=1)
    return np.asarray(mask, dtype=bool)


def _shape_mask(
    rng: np.random.Generator, cls: int, h: int, w: int, cx: float, cy: float, r: float
) -> np.ndarray:
    mask = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask)
    if cls == CIRCLE:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
    elif cls == RECTANGLE:
        hw, hh, t = r * rng.uniform(0.6, 1.2), r * rng.uniform(0.6, 1.2), rng.uniform(0, math.pi)
        c, s = math.cos(t), math.sin(t)
        corners = [(-hw, -hh), (hw, -hh), (hw, hh), (-hw, hh)]
        draw.polygon([(cx + x * c - y * s, cy + x * s + y * c) for x, y in corners], fill=1)
    else:  # TRIANGLE: roughly equilateral, random rotation
        t0 = rng.uniform(0, 2 * math.pi)
        angles = t0 + np.array([0.0, 2.094, 4.189]) + rng.uniform(-0.3, 0.3, 3)
        radii = r * rng.uniform(1.0, 1.3, 3)
        draw.polygon([(cx + a * math.cos(t), cy + a * math.sin(t)) for a, t in zip(radii, angles)], fill=1)
    return np.asarray(mask, dtype=bool)


def _texture(rng: np.random.Generator, cls: int, h: int, w: int, scale: float) -> np.ndarray:
    """Two-colour stripes or checkerboard at a random angle and period, float HxWx3."""
    a, b = rng.integers(0, 256, 3).astype(np.float32), rng.integers(0, 256, 3).astype(np.float32)
    while np.abs(a - b).sum() < 150:
        b = rng.integers(0, 256, 3).astype(np.float32)
    t = rng.uniform(0, math.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    u, v = xx * math.cos(t) + yy * math.sin(t), -xx * math.sin(t) + yy * math.cos(t)
    period = rng.uniform(0.04, 0.09) * scale + 2
    if cls == STRIPES:
        sel = (u / period) % 1.0 < 0.5
    else:
        sel = (np.floor(u / period) + np.floor(v / period)) % 2 == 0
    return np.where(sel[..., None], a, b)


def generate_sample(
    rng: np.random.Generator, size: tuple[int, int] = (128, 128)
) -> tuple[np.ndarray, np.ndarray]:
    """One image (HxWx3 uint8) and its label map (HxW uint8, values = indices into `CLASSES`)."""
    h, w = size
    scale = float(min(h, w))
    base = _smooth_field(rng, h, w)
    canvas = Image.fromarray(base.astype(np.uint8))
    _clutter(rng, canvas, scale)
    image = np.asarray(canvas, dtype=np.float32).copy()
    labels = np.zeros((h, w), dtype=np.uint8)
    placed: list[tuple[float, float, float]] = []
    for _ in range(rng.integers(2, 6)):
        cls = int(rng.integers(1, len(CLASSES)))
        r = rng.uniform(0.11, 0.25) * scale
        # Objects may touch and overlap a little (later ones occlude), but not hide each other's outline.
        for _attempt in range(20):
            cx, cy = rng.uniform(0.15, 0.85) * w, rng.uniform(0.15, 0.85) * h
            if all(math.hypot(cx - x, cy - y) >= 0.8 * (r + q) for x, y, q in placed):
                break
        else:
            continue
        placed.append((cx, cy, r))
        if cls in (STRIPES, CHECKER):
            mask = _region_mask(rng, h, w, cx, cy, r * 1.1)
            image[mask] = _texture(rng, cls, h, w, scale)[mask]
        else:
            mask = _shape_mask(rng, cls, h, w, cx, cy, r)
            local = base[int(np.clip(cy, 0, h - 1)), int(np.clip(cx, 0, w - 1))]
            image[mask] = _contrasting_colour(rng, local)
        labels[mask] = cls
    image += rng.normal(0.0, rng.uniform(2.0, 10.0), image.shape).astype(np.float32)  # sensor noise
    return np.clip(image + 0.5, 0, 255).astype(np.uint8), labels


def sample(seed: int, index: int, size: tuple[int, int] = (128, 128)) -> tuple[np.ndarray, np.ndarray]:
    """Sample `index` of the stream `seed` (independent of how many other samples are drawn)."""
    return generate_sample(np.random.default_rng([seed, index]), size)


def make_dataset(n: int, seed: int, size: tuple[int, int] = (128, 128)) -> tuple[np.ndarray, np.ndarray]:
    """`n` samples stacked: images (n, H, W, 3) uint8 and labels (n, H, W) uint8."""
    pairs = [sample(seed, i, size) for i in range(n)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def mean_iou(
    pred: np.ndarray, target: np.ndarray, num_classes: int = len(CLASSES)
) -> tuple[float, list[float]]:
    """mIoU over the classes that occur in `target` or `pred` (accumulated over all pixels given)."""
    pred, target = np.asarray(pred).ravel(), np.asarray(target).ravel()
    confusion = np.bincount(target * num_classes + pred, minlength=num_classes**2).reshape(num_classes, -1)
    inter = np.diag(confusion).astype(np.float64)
    union = confusion.sum(0) + confusion.sum(1) - inter
    ious = [float(i / u) if u > 0 else float("nan") for i, u in zip(inter, union)]
    present = [x for x in ious if not math.isnan(x)]
    return (float(np.mean(present)) if present else float("nan")), ious
