"""Heatmap overlays: where in a slice the model saw the evidence for its label.

The classifier gives each prediction a class activation map (7x7, 0..1; ml.inference),
which the classification service records on the prediction as a grid (`heatmap_grid`).
The overlay PNG is rendered from that grid on first view, not by the worker (most are
never looked at, and rendering and storing one cost a worker ~5 ms of CPU per job):
`image_heatmap_png` renders it over the slice the model classified, stores it in S3
under a key the server makes up, never from user input (`heatmap_key_for`), records
that key on the prediction, and serves it; later views read it from S3. The API and the
admin both call it, after the same site check as the image
(`selectors.image_heatmap_prediction_get`).
"""

import hashlib
from collections.abc import Sequence

import numpy as np

from diagnostics import selectors, storage
from diagnostics.models import Prediction

HEATMAP_CONTENT_TYPE = "image/png"
# The overlay's side in pixels: the model's input size (ml.heatmap.DEFAULT_SIZE), i.e. the
# slice as the model saw it (resized square); the admin and clients scale it for display.
HEATMAP_SIDE = 224
# Decimals kept of each cell in the stored grid: far below what an overlay can show.
GRID_DECIMALS = 4


def heatmap_key_for(image) -> str:
    """The S3 key of `image`'s overlay: made from its case's and its own ids only."""
    return f"heatmaps/{image.case_id}/{image.id}.png"


def heatmap_grid(heatmap) -> list[list[float]] | None:
    """The map as nested lists for `Prediction.heatmap` (JSON), cells clipped to 0..1 and
    rounded; None when there is no map. Raises ValueError for anything but a 2-D grid."""
    if heatmap is None:
        return None
    grid = np.clip(np.nan_to_num(np.asarray(heatmap, dtype=np.float64)), 0.0, 1.0)
    if grid.ndim != 2 or 0 in grid.shape:
        raise ValueError(f"a heatmap is a 2-D grid, not an array of shape {grid.shape}")
    return np.round(grid, GRID_DECIMALS).tolist()


def heatmap_overlay_render(*, image_bytes: bytes, heatmap: Sequence | np.ndarray) -> bytes:
    """PNG bytes of the map (a 2-D 0..1 grid: array or nested lists) over the slice's
    `image_bytes` (ml.heatmap.overlay_png, HEATMAP_SIDE square). Raises
    ml.data.UnreadableImage for bytes that do not decode, ValueError for a bad map."""
    from ml.heatmap import overlay_png  # numpy, Pillow and matplotlib's colormaps only

    return overlay_png(image_bytes, np.asarray(heatmap, dtype=np.float32), size=HEATMAP_SIDE)


def image_heatmap_png(*, user, image_id, case_id=None) -> bytes | None:
    """The heatmap overlay (PNG) of an image this user may see (its case's site is theirs;
    `case_id`, when given, must match too); None when there is no such image, or it has no
    prediction or no map (rejected images have neither).

    The overlay is read from S3 when its key is recorded and the object is there;
    otherwise (first view, or the object went missing) it is rendered from the slice the
    model classified (a DICOM's 8-bit rendering, else the image) and the stored grid,
    written to S3 and its key recorded on the prediction. Two first views at once render
    the same bytes under the same key, and only one records it: harmless. Filling this
    cache of a derived image changes nothing a reader decides on, so it is not audited.

    Raises storage.StorageUnavailable when S3 cannot be read or refuses the write."""
    prediction = selectors.image_heatmap_prediction_get(
        user=user, image_id=image_id, case_id=case_id
    )
    if prediction is None:
        return None
    if prediction.heatmap_key:
        png = _get_if_stored(prediction.heatmap_key)
        if png is not None:
            return png
    image = prediction.image
    slice_bytes = _get_if_stored(image.rendering_key or image.s3_key)
    if slice_bytes is None:
        # The classified slice itself is gone: there is nothing to draw the map over.
        return None
    png = heatmap_overlay_render(image_bytes=slice_bytes, heatmap=prediction.heatmap)
    key = prediction.heatmap_key or heatmap_key_for(image)
    storage.put(key, png, content_type=HEATMAP_CONTENT_TYPE, sha256=hashlib.sha256(png).hexdigest())
    Prediction.objects.filter(id=prediction.id, heatmap_key="").update(heatmap_key=key)
    return png


def _get_if_stored(key: str) -> bytes | None:
    """The object's bytes; None when S3 answers that it has no such object. Raises
    storage.StorageUnavailable when S3 cannot be read."""
    try:
        return storage.get(key)
    except storage.StorageUnavailable:
        # Only when the read failed pay for the check of whether the object is missing.
        if not storage.exists(key):
            return None
        raise
