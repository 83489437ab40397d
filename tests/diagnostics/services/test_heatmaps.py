"""Heatmap overlays: rendered over the slice, stored in S3 under a server-made key, with no
database access (the workers call it from a thread pool)."""

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image as PilImage

from diagnostics import services, storage
from diagnostics.services.heatmaps import HEATMAP_SIDE
from tests.factories import ImageFactory
from tests.images import image_bytes

GRID = np.linspace(0, 1, 49, dtype=np.float32).reshape(7, 7)


@pytest.mark.django_db
def test_the_key_is_made_from_the_ids_only():
    image = ImageFactory(original_name="../../etc/passwd.png")

    assert services.heatmap_key_for(image) == f"heatmaps/{image.case_id}/{image.id}.png"


def test_the_overlay_is_a_png_in_s3_under_that_key(s3_keys):
    # No django_db mark: any query inside would fail the test.
    key = services.heatmap_overlay_store(
        image_id="00000000-0000-0000-0000-000000000002",
        case_id="00000000-0000-0000-0000-000000000001",
        image_bytes=image_bytes(96, 80),
        heatmap=GRID,
    )

    assert key == (
        "heatmaps/00000000-0000-0000-0000-000000000001/00000000-0000-0000-0000-000000000002.png"
    )
    assert s3_keys() == [key]
    head = storage._client().head_object(Bucket=storage.settings.S3_BUCKET, Key=key)
    assert head["ContentType"] == "image/png"
    with PilImage.open(io.BytesIO(storage.get(key))) as png:
        assert (png.format, png.size, png.mode) == ("PNG", (HEATMAP_SIDE, HEATMAP_SIDE), "RGB")
        # The map's hot corner (bottom right) is coloured; its cold corner stays gray.
        hot, cold = png.getpixel((HEATMAP_SIDE - 1, HEATMAP_SIDE - 1)), png.getpixel((0, 0))
    assert max(hot) - min(hot) > 40
    assert max(cold) - min(cold) < 5


def test_the_grid_may_be_nested_lists_as_stored(s3_keys):
    key = services.heatmap_overlay_store(
        image_id="i", case_id="c", image_bytes=image_bytes(), heatmap=services.heatmap_grid(GRID)
    )

    assert storage.get(key).startswith(b"\x89PNG")


def test_worker_threads_store_overlays_side_by_side(s3_keys):
    def store(n):
        return services.heatmap_overlay_store(
            image_id=f"image-{n}", case_id="case", image_bytes=image_bytes(seed=n), heatmap=GRID
        )

    with ThreadPoolExecutor(max_workers=4) as pool:
        keys = list(pool.map(store, range(8)))

    assert sorted(keys) == s3_keys() == sorted(f"heatmaps/case/image-{n}.png" for n in range(8))


def test_storage_down_raises_storage_unavailable(s3_down):
    with pytest.raises(storage.StorageUnavailable):
        services.heatmap_overlay_store(
            image_id="i", case_id="c", image_bytes=image_bytes(), heatmap=GRID
        )


def test_unreadable_bytes_raise_before_anything_is_stored(s3_keys):
    from ml.data import UnreadableImage

    with pytest.raises(UnreadableImage):
        services.heatmap_overlay_store(
            image_id="i", case_id="c", image_bytes=b"not an image", heatmap=GRID
        )
    assert s3_keys() == []


def test_the_grid_for_the_database_is_json_ready():
    grid = services.heatmap_grid(np.array([[0.123456, 1.5], [np.nan, -0.2]], dtype=np.float32))

    assert grid == [[0.1235, 1.0], [0.0, 0.0]]
    assert all(type(cell) is float for row in grid for cell in row)
    assert services.heatmap_grid(None) is None
    with pytest.raises(ValueError, match="2-D grid"):
        services.heatmap_grid(np.zeros(7))
