"""Heatmap overlays: a prediction's class activation map drawn over its image.

    from ml.heatmap import overlay_png
    png = overlay_png(image_bytes, prediction.heatmap)          # at the model's input size
    png = overlay_png(image_bytes, prediction.heatmap, size=512)

The image is decoded with ml.data.decode_image (the model's own preprocessing, so the map
lines up with what the model saw: the same square resize), shown in grayscale, and the
map - upsampled bilinearly from feature resolution (7x7) - is coloured with a matplotlib
colormap and alpha-blended on top, more opaque where the evidence is stronger.
Only Pillow, numpy and matplotlib's colormaps are imported (no pyplot, no TensorFlow).
"""

from __future__ import annotations

import functools
import io

import numpy as np
from PIL import Image

from ml.data import decode_image

DEFAULT_SIZE = 224
COLORMAP = "jet"
MAX_ALPHA = 0.55  # opacity of the colour where the map is 1


def upsample(heatmap: np.ndarray, size: int) -> np.ndarray:
    """(h, w) map in 0..1 -> (size, size) float32, bilinear (pixel centres aligned)."""
    heatmap = np.clip(np.nan_to_num(np.asarray(heatmap, dtype=np.float32)), 0.0, 1.0)
    if heatmap.ndim != 2:
        raise ValueError(f"heatmap must be 2-D, not {heatmap.shape}")
    image = Image.fromarray(heatmap, mode="F").resize((size, size), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)


@functools.cache
def _colours(colormap: str) -> np.ndarray:
    """The colormap sampled at 256 levels: (256, 3) uint8 (a lookup per pixel is several
    times faster than calling the colormap on every pixel)."""
    from matplotlib import colormaps

    return np.round(colormaps[colormap](np.linspace(0.0, 1.0, 256))[:, :3] * 255).astype(np.uint8)


def overlay(image: np.ndarray, heatmap: np.ndarray, colormap: str = COLORMAP) -> np.ndarray:
    """uint8 RGB (s, s, 3) image + (h, w) 0..1 map -> uint8 RGB (s, s, 3): the image in
    grayscale with the coloured map blended over it, MAX_ALPHA opaque where the map is 1."""
    size = image.shape[0]
    levels = np.round(upsample(heatmap, size) * 255).astype(np.uint8)
    colour = Image.fromarray(_colours(colormap)[levels], mode="RGB")
    gray = Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("L").convert("RGB")
    opacity = Image.fromarray(np.round(levels * MAX_ALPHA).astype(np.uint8), mode="L")
    # Pillow blends in C: gray where the opacity is 0, towards the colour as it rises.
    return np.asarray(Image.composite(colour, gray, opacity))


def overlay_png(image: bytes | np.ndarray, heatmap: np.ndarray, size: int | None = None) -> bytes:
    """PNG bytes of the heatmap over the image, `size` x `size` (default 224, the model's
    input size). `image`: encoded bytes, or the uint8 RGB square ml.data.decode_image made
    of them for the model (a worker has it already: no second decode). Raises
    ml.data.UnreadableImage for bytes Pillow cannot decode."""
    side = int(size or DEFAULT_SIZE)
    if side < 1:
        raise ValueError(f"size must be positive, not {size}")
    if isinstance(image, np.ndarray):
        pixels = np.asarray(image, dtype=np.uint8)
        if pixels.shape[:2] != (side, side):
            pixels = np.asarray(Image.fromarray(pixels).resize((side, side), Image.BILINEAR))
    else:
        pixels = decode_image(image, side)
    blended = overlay(pixels, heatmap)
    buffer = io.BytesIO()
    # zlib level 1: a third of the default's time for a file about 6 % larger.
    Image.fromarray(blended, mode="RGB").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
