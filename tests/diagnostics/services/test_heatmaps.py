"""Heatmap overlays: rendered over the slice on first view, stored in S3 under a server-made
key recorded on the prediction, and read from S3 on later views."""

import io
from unittest import mock

import numpy as np
import pytest
from PIL import Image as PilImage

from diagnostics import selectors, services, storage
from diagnostics.models import Prediction, Status
from diagnostics.services.heatmaps import HEATMAP_SIDE, heatmap_overlay_render
from tests.factories import (
    CaseFactory,
    ImageFactory,
    PredictionFactory,
    RejectedImageFactory,
    UserFactory,
    slice_stored,
)
from tests.images import image_bytes

GRID = np.linspace(0, 1, 49, dtype=np.float32).reshape(7, 7)
RENDER = "diagnostics.services.heatmaps.heatmap_overlay_render"


def png_of(data: bytes) -> tuple:
    with PilImage.open(io.BytesIO(data)) as png:
        return png.format, png.size, png.mode


@pytest.fixture
def user():
    return UserFactory()


def viewable(user, **kwargs) -> Prediction:
    """A prediction with a grid and no overlay yet, its slice in S3: as a worker leaves it."""
    case = CaseFactory(uploaded_by=user, status=Status.DONE)
    prediction = PredictionFactory(image__case=case, with_heatmap=True, **kwargs)
    slice_stored(prediction.image, image_bytes(96, 80, seed=3))
    return prediction


def recorded_key(prediction) -> str:
    return Prediction.objects.values_list("heatmap_key", flat=True).get(id=prediction.id)


@pytest.mark.django_db
def test_the_key_is_made_from_the_ids_only():
    image = ImageFactory(original_name="../../etc/passwd.png")

    assert services.heatmap_key_for(image) == f"heatmaps/{image.case_id}/{image.id}.png"


def test_the_overlay_is_the_map_over_the_slice_as_the_model_saw_it():
    # No django_db mark and no S3: rendering is pure.
    png = heatmap_overlay_render(image_bytes=image_bytes(96, 80), heatmap=GRID)

    assert png_of(png) == ("PNG", (HEATMAP_SIDE, HEATMAP_SIDE), "RGB")
    with PilImage.open(io.BytesIO(png)) as image:
        # The map's hot corner (bottom right) is coloured; its cold corner stays gray.
        hot, cold = image.getpixel((HEATMAP_SIDE - 1, HEATMAP_SIDE - 1)), image.getpixel((0, 0))
    assert max(hot) - min(hot) > 40
    assert max(cold) - min(cold) < 5


def test_the_grid_may_be_nested_lists_as_stored():
    as_stored = services.heatmap_grid(GRID)

    assert heatmap_overlay_render(image_bytes=image_bytes(), heatmap=as_stored).startswith(
        b"\x89PNG"
    )


def test_unreadable_bytes_raise():
    from ml.data import UnreadableImage

    with pytest.raises(UnreadableImage):
        heatmap_overlay_render(image_bytes=b"not an image", heatmap=GRID)


@pytest.mark.django_db
def test_the_first_view_renders_stores_and_records_the_overlay(user, s3_keys):
    prediction = viewable(user)
    image = prediction.image
    assert prediction.heatmap_key == ""

    png = services.image_heatmap_png(user=user, image_id=image.id)

    key = services.heatmap_key_for(image)
    assert recorded_key(prediction) == key
    assert s3_keys() == sorted([image.s3_key, key])
    assert storage.get(key) == png
    assert png == heatmap_overlay_render(
        image_bytes=storage.get(image.s3_key), heatmap=prediction.heatmap
    )
    assert png_of(png) == ("PNG", (HEATMAP_SIDE, HEATMAP_SIDE), "RGB")
    head = storage._client().head_object(Bucket=storage.settings.S3_BUCKET, Key=key)
    assert head["ContentType"] == "image/png"


@pytest.mark.django_db
def test_later_views_read_it_from_s3_without_rendering(user, s3_bucket):
    prediction = viewable(user)
    first = services.image_heatmap_png(user=user, image_id=prediction.image_id)

    with mock.patch(RENDER, side_effect=AssertionError("rendered again")):
        again = services.image_heatmap_png(user=user, image_id=prediction.image_id)
        in_its_case = services.image_heatmap_png(
            user=user, image_id=prediction.image_id, case_id=prediction.image.case_id
        )

    assert first == again == in_its_case


@pytest.mark.django_db
def test_an_overlay_gone_from_s3_is_rendered_again_under_its_key(user, s3_bucket):
    prediction = viewable(user)
    first = services.image_heatmap_png(user=user, image_id=prediction.image_id)
    key = recorded_key(prediction)
    storage.delete_many([key])

    again = services.image_heatmap_png(user=user, image_id=prediction.image_id)

    assert again == first == storage.get(key)
    assert recorded_key(prediction) == key


@pytest.mark.django_db
def test_a_dicom_is_drawn_over_its_rendering_the_model_classified(user, s3_bucket):
    prediction = viewable(user)
    image = prediction.image
    rendering = image_bytes(64, 64, format="PNG", mode="L", seed=9)
    image.rendering_key = f"renderings/{image.case_id}/{image.id}.png"
    image.save(update_fields=["rendering_key"])
    storage.put(image.rendering_key, rendering, content_type="image/png", sha256="0" * 64)
    # The stored DICOM itself is nothing Pillow could decode.
    storage.put(image.s3_key, b"DICM not pixels", content_type="application/dicom", sha256="0")

    png = services.image_heatmap_png(user=user, image_id=image.id)

    assert png == heatmap_overlay_render(image_bytes=rendering, heatmap=prediction.heatmap)


@pytest.mark.django_db
def test_two_first_views_at_once_store_the_same_overlay_and_record_its_key_once(user, s3_bucket):
    prediction = viewable(user)
    # What the second view read before the first recorded the key.
    stale = selectors.image_heatmap_prediction_get(user=user, image_id=prediction.image_id)
    first = services.image_heatmap_png(user=user, image_id=prediction.image_id)

    with mock.patch.object(selectors, "image_heatmap_prediction_get", return_value=stale):
        second = services.image_heatmap_png(user=user, image_id=prediction.image_id)

    assert stale.heatmap_key == ""
    assert first == second == storage.get(services.heatmap_key_for(prediction.image))
    assert recorded_key(prediction) == services.heatmap_key_for(prediction.image)


@pytest.mark.django_db
def test_no_overlay_for_another_site_no_prediction_no_map_or_another_case(user, s3_keys):
    others = viewable(UserFactory())
    without_map = PredictionFactory(image__case=CaseFactory(uploaded_by=user))
    rejected = RejectedImageFactory(case=CaseFactory(uploaded_by=user))
    mine = viewable(user)
    before = s3_keys()

    assert services.image_heatmap_png(user=user, image_id=others.image_id) is None
    assert services.image_heatmap_png(user=user, image_id=without_map.image_id) is None
    assert services.image_heatmap_png(user=user, image_id=rejected.id) is None
    assert (
        services.image_heatmap_png(user=user, image_id=mine.image_id, case_id=rejected.case_id)
        is None
    )
    assert s3_keys() == before  # nothing was rendered
    assert recorded_key(others) == recorded_key(mine) == ""


@pytest.mark.django_db
def test_no_overlay_when_its_slice_is_gone_from_s3(user, s3_keys):
    prediction = PredictionFactory(
        image__case=CaseFactory(uploaded_by=user, status=Status.DONE), with_heatmap=True
    )

    assert services.image_heatmap_png(user=user, image_id=prediction.image_id) is None
    assert s3_keys() == []
    assert recorded_key(prediction) == ""


@pytest.mark.django_db
def test_storage_down_raises_storage_unavailable_and_records_nothing(user, s3_bucket, request):
    prediction = viewable(user)
    request.getfixturevalue("s3_down")

    with pytest.raises(storage.StorageUnavailable):
        services.image_heatmap_png(user=user, image_id=prediction.image_id)
    assert recorded_key(prediction) == ""


def test_the_grid_for_the_database_is_json_ready():
    grid = services.heatmap_grid(np.array([[0.123456, 1.5], [np.nan, -0.2]], dtype=np.float32))

    assert grid == [[0.1235, 1.0], [0.0, 0.0]]
    assert all(type(cell) is float for row in grid for cell in row)
    assert services.heatmap_grid(None) is None
    with pytest.raises(ValueError, match="2-D grid"):
        services.heatmap_grid(np.zeros(7))
