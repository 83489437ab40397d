"""Heatmap overlays: where in a slice the model saw the evidence for its label.

The classifier gives each prediction a class activation map (7x7, 0..1; ml.inference).
The classification service renders it over the slice with `heatmap_overlay_store` (a PNG
in S3 under a key the server makes up, never from user input), and records the key and
the grid (`heatmap_grid`) on the prediction; the API and the admin serve the PNG through
the app after the same site check as the image (`selectors.image_heatmap_get`).

Both functions here touch neither the database nor Django's request state, so a worker
may call them from a thread pool: pure rendering and one S3 put.
"""

import hashlib
from collections.abc import Sequence

import numpy as np

from diagnostics import storage

HEATMAP_CONTENT_TYPE = "image/png"
# The overlay's side in pixels: the model's input size (ml.heatmap.DEFAULT_SIZE), i.e. the
# slice as the model saw it (resized square); the admin and clients scale it for display.
HEATMAP_SIDE = 224
# Decimals kept of each cell in the stored grid: far below what an overlay can show.
GRID_DECIMALS = 4


def heatmap_key_for(image) -> str:
    """The S3 key of `image`'s overlay: made from its case's and its own ids only."""
    return _key(case_id=image.case_id, image_id=image.id)


def _key(*, case_id, image_id) -> str:
    return f"heatmaps/{case_id}/{image_id}.png"


def heatmap_grid(heatmap) -> list[list[float]] | None:
    """The map as nested lists for `Prediction.heatmap` (JSON), cells clipped to 0..1 and
    rounded; None when there is no map. Raises ValueError for anything but a 2-D grid."""
    if heatmap is None:
        return None
    grid = np.clip(np.nan_to_num(np.asarray(heatmap, dtype=np.float64)), 0.0, 1.0)
    if grid.ndim != 2 or 0 in grid.shape:
        raise ValueError(f"a heatmap is a 2-D grid, not an array of shape {grid.shape}")
    return np.round(grid, GRID_DECIMALS).tolist()


def heatmap_overlay_render(
    *, image_bytes: bytes, heatmap: Sequence | np.ndarray, pixels: np.ndarray | None = None
) -> bytes:
    """PNG bytes of the map over the slice (ml.heatmap.overlay_png, HEATMAP_SIDE square).
    Raises ml.data.UnreadableImage for bytes that do not decode, ValueError for a bad map."""
    from ml.heatmap import overlay_png  # numpy, Pillow and matplotlib's colormaps only

    # `pixels`: the slice as the model saw it (ml.data.decode_image), saving a second decode.
    image = image_bytes if pixels is None else pixels
    return overlay_png(image, np.asarray(heatmap, dtype=np.float32), size=HEATMAP_SIDE)


def heatmap_overlay_store(
    *, image_id, case_id, image_bytes: bytes, heatmap, pixels: np.ndarray | None = None
) -> str:
    """Render the overlay of `heatmap` (a 2-D 0..1 grid: array or nested lists) on the
    slice's `image_bytes` (what the model classified: the image, or a DICOM's rendering),
    write it to S3 and return its key. No database access: callable from worker threads.

    Raises storage.StorageUnavailable when S3 refuses the write, ml.data.UnreadableImage
    or ValueError when the image or the map cannot be rendered."""
    png = heatmap_overlay_render(image_bytes=image_bytes, heatmap=heatmap, pixels=pixels)
    key = _key(case_id=case_id, image_id=image_id)
    storage.put(key, png, content_type=HEATMAP_CONTENT_TYPE, sha256=hashlib.sha256(png).hexdigest())
    return key
