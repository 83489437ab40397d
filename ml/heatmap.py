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


def overlay(image: np.ndarray, heatmap: np.ndarray, colormap: str = COLORMAP) -> np.ndarray:
    """uint8 RGB (s, s, 3) image + (h, w) 0..1 map -> uint8 RGB (s, s, 3) blend."""
    from matplotlib import colormaps

    size = image.shape[0]
    weights = upsample(heatmap, size)
    gray = np.asarray(image, dtype=np.float32).mean(axis=2, keepdims=True) / 255.0
    colour = colormaps[colormap](weights)[..., :3].astype(np.float32)
    alpha = (MAX_ALPHA * weights)[..., None]
    blended = (1.0 - alpha) * gray + alpha * colour
    return np.round(np.clip(blended, 0.0, 1.0) * 255).astype(np.uint8)


def overlay_png(image_bytes: bytes, heatmap: np.ndarray, size: int | None = None) -> bytes:
    """PNG bytes of the heatmap over the image, `size` x `size` (default 224, the model's
    input size). Raises ml.data.UnreadableImage for bytes Pillow cannot decode."""
    side = int(size or DEFAULT_SIZE)
    if side < 1:
        raise ValueError(f"size must be positive, not {size}")
    blended = overlay(decode_image(image_bytes, side), heatmap)
    buffer = io.BytesIO()
    Image.fromarray(blended, mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()
