"""Synthetic scans for the benchmarks: distinct 512x512 grayscale JPEGs with smooth
anatomy-like structure, about the size and entropy of a real MRI slice export (a real
dataset is not needed to time decoding and inference)."""

import io

import numpy as np
from PIL import Image


def mri_like_jpeg(index: int, size: int = 512) -> bytes:
    rng = np.random.default_rng(index)
    yy, xx = np.mgrid[:size, :size] / size
    # A bright ellipse (the head) with smooth texture and a little noise, as in an MRI slice.
    head = ((xx - 0.5) / 0.38) ** 2 + ((yy - 0.5) / 0.45) ** 2 < 1
    texture = 90 + 50 * np.sin(xx * 23 + index) * np.cos(yy * 17 - index)
    pixels = np.where(head, texture, 5) + rng.normal(0, 6, size=(size, size))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="L").save(
        buffer, format="JPEG", quality=90
    )
    return buffer.getvalue()
