"""Synthetic scans for the benchmarks: distinct 512x512 grayscale JPEGs with smooth
anatomy-like structure, about the size and entropy of a real MRI slice export (a real
dataset is not needed to time decoding and inference)."""

import functools
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


@functools.cache
def _dataset_files() -> tuple:
    from ml.config import IMAGE_SUFFIXES, default_dataset_dir

    root = default_dataset_dir()
    return tuple(
        sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    )


@functools.cache
def _dataset_image(path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("L") if image.mode not in ("L", "RGB") else image.copy()


def scans(count: int, salt: int) -> list[bytes]:
    """`count` distinct JPEGs of real MRI slices from the shared dataset (cycled), each
    re-encoded with a comment naming `salt` and its index, so no two runs upload equal bytes
    (uploads of equal bytes are deduplicated). Synthetic ones (mri_like_jpeg) when the
    dataset is not there: the model rejects most of those as out of distribution."""
    files = _dataset_files()
    if not files:
        return [mri_like_jpeg(salt + index) for index in range(count)]
    out = []
    for index in range(count):
        buffer = io.BytesIO()
        image = _dataset_image(files[(salt + index * 7919) % len(files)])
        image.save(buffer, format="JPEG", quality=90, comment=f"bench {salt} {index}".encode())
        out.append(buffer.getvalue())
    return out
