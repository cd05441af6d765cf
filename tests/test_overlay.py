"""`palette.overlay` on a large photo: blended in strips, so --overlay does not double the run's memory."""

from __future__ import annotations

import tracemalloc

import numpy as np
from PIL import Image

from upernet_fast import palette


def _reference_overlay(image, labels, pal, alpha=0.5):
    """The whole-image float blend the strips must reproduce exactly."""
    rgb = np.asarray(image, dtype=np.float32)
    colours = pal[labels].astype(np.float32)
    return np.clip((1 - alpha) * rgb + alpha * colours + 0.5, 0, 255).astype(np.uint8)


def test_overlay_strips_equal_whole_image_blend():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (301, 97, 3), dtype=np.uint8))
    labels = rng.integers(0, 7, (301, 97)).astype(np.uint8)
    pal = palette.palette_for(7)
    out = palette.overlay(image, labels, pal, {1: "one"}, strip_pixels=1000)
    assert out.height == 301 and out.width > 97  # legend panel on the right
    assert np.array_equal(np.asarray(out)[:, :97], _reference_overlay(image, labels, pal))
    plain = palette.overlay(image, labels, pal, legend=False, strip_pixels=1000)
    assert np.array_equal(np.asarray(plain), _reference_overlay(image, labels, pal))


def test_overlay_memory_stays_far_below_one_float_copy():
    """A 3000x2000 photo: the old whole-image float blend allocated ~5 float32 copies (370 MB) in numpy;
    the strips stay under half of one (36 MB). tracemalloc sees numpy's allocations (not PIL's: the
    output canvas, 18 MB, is the only large one there)."""
    h, w = 2000, 3000
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    labels = rng.integers(0, 150, (h, w)).astype(np.uint8)
    pal = palette.palette_for(150)
    tracemalloc.start()
    try:
        palette.overlay(image, labels, pal, dict(enumerate(palette.ADE20K_CLASSES)))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    one_float_copy = h * w * 3 * 4
    assert peak < one_float_copy / 2, f"numpy peak {peak / 2**20:.0f} MB"
