"""Trust signals in the API: each prediction's review flag, OOD score and heatmap URL,
rejected images, and GET /api/v1/images/{id}/heatmap/ (the overlay PNG, site-scoped,
rendered on first view and then read from S3)."""

import io
import uuid
from unittest import mock

import pytest
from PIL import Image as PilImage
from rest_framework.test import APIClient

from diagnostics import storage
from diagnostics.models import Prediction, Status
from tests.factories import (
    CaseFactory,
    PredictionFactory,
    RejectedImageFactory,
    UserFactory,
    slice_stored,
    token_for,
)
from tests.images import image_bytes

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("s3_bucket")]

NOT_FOUND = {
    "detail": "no heatmap: no such image at your site, or it has none",
    "code": "not_found",
}
UNAVAILABLE = {"detail": "object storage is unavailable, retry later", "code": "unavailable"}
RENDER = "diagnostics.services.heatmaps.heatmap_overlay_render"


@pytest.fixture
def user():
    return UserFactory()


@pytest.fixture
def client(user):
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {token_for(user)}")
    return api


def heatmap_prediction(user=None, **kwargs):
    """A prediction with a heatmap grid and its slice in S3, as the workers leave it: the
    overlay is not rendered yet (no `heatmap_key`)."""
    case = CaseFactory(uploaded_by=user or UserFactory(), status=Status.DONE)
    prediction = PredictionFactory(image__case=case, with_heatmap=True, **kwargs)
    slice_stored(prediction.image, image_bytes(seed=3))
    return prediction


def recorded_key(prediction) -> str:
    return Prediction.objects.values_list("heatmap_key", flat=True).get(id=prediction.id)


def test_a_prediction_shows_its_review_flag_ood_score_and_heatmap_url(client, user):
    prediction = heatmap_prediction(user, needs_review=True)
    plain = PredictionFactory(image__case=prediction.image.case)
    assert prediction.heatmap_key == ""  # the URL is there before the overlay is rendered

    response = client.get(f"/api/v1/cases/{prediction.image.case_id}/")

    assert response.status_code == 200
    images = {image["id"]: image for image in response.json()["images"]}
    shown = images[str(prediction.image_id)]
    assert shown["ood_score"] == 812.5
    assert {key: shown["prediction"][key] for key in ("needs_review", "ood_score")} == {
        "needs_review": True,
        "ood_score": 812.5,
    }
    url = shown["prediction"]["heatmap_url"]
    assert url == f"http://testserver/api/v1/images/{prediction.image_id}/heatmap/"
    fetched = client.get(url)
    assert fetched.status_code == 200 and fetched.content.startswith(b"\x89PNG")
    without = images[str(plain.image_id)]
    assert (without["ood_score"], without["prediction"]["needs_review"]) == (None, False)
    assert (without["prediction"]["ood_score"], without["prediction"]["heatmap_url"]) == (
        None,
        None,
    )


def test_a_rejected_image_has_its_reason_and_score_and_no_label(client, user):
    case = CaseFactory(uploaded_by=user, status=Status.REJECTED)
    image = RejectedImageFactory(case=case)

    body = client.get(f"/api/v1/cases/{case.id}/").json()

    assert body["status"] == "rejected"
    [shown] = body["images"]
    assert {key: shown[key] for key in ("id", "status", "error", "ood_score", "prediction")} == {
        "id": str(image.id),
        "status": "rejected",
        "error": "not a brain MRI slice: the image is blank (almost a single grey level)",
        "ood_score": 9120.0,
        "prediction": None,
    }


def test_cases_can_be_listed_by_the_rejected_status(client, user):
    rejected = CaseFactory(uploaded_by=user, status=Status.REJECTED)
    CaseFactory(uploaded_by=user, status=Status.DONE)
    CaseFactory(uploaded_by=UserFactory(), status=Status.REJECTED)  # another site's

    response = client.get("/api/v1/cases/?status=rejected")

    assert response.status_code == 200
    assert [case["id"] for case in response.json()["results"]] == [str(rejected.id)]


def test_the_first_view_renders_the_heatmap_stores_it_and_records_its_key(client, user, s3_keys):
    prediction = heatmap_prediction(user)
    image = prediction.image

    response = client.get(f"/api/v1/images/{prediction.image_id}/heatmap/")

    assert response.status_code == 200
    assert response["Content-Type"] == "image/png"
    assert response["Cache-Control"] == "private, max-age=300"
    assert response["X-Content-Type-Options"] == "nosniff"
    key = f"heatmaps/{image.case_id}/{image.id}.png"
    assert recorded_key(prediction) == key
    assert s3_keys() == sorted([image.s3_key, key])
    assert storage.get(key) == response.content
    with PilImage.open(io.BytesIO(response.content)) as png:
        assert (png.format, png.size) == ("PNG", (224, 224))


def test_later_views_are_served_from_s3_without_rendering(client, user):
    prediction = heatmap_prediction(user)
    first = client.get(f"/api/v1/images/{prediction.image_id}/heatmap/")

    with mock.patch(RENDER, side_effect=AssertionError("rendered again")):
        again = client.get(f"/api/v1/images/{prediction.image_id}/heatmap/")

    assert (first.status_code, again.status_code) == (200, 200)
    assert again.content == first.content == storage.get(recorded_key(prediction))


def test_a_heatmap_gone_from_s3_is_rendered_again(client, user):
    prediction = heatmap_prediction(user)
    first = client.get(f"/api/v1/images/{prediction.image_id}/heatmap/")
    key = recorded_key(prediction)
    storage.delete_many([key])
    assert not storage.exists(key)

    again = client.get(f"/api/v1/images/{prediction.image_id}/heatmap/")

    assert again.status_code == 200
    assert again.content == first.content == storage.get(key)
    assert recorded_key(prediction) == key


@pytest.mark.parametrize("accept", ["image/png", "image/avif,image/webp,*/*", "application/json"])
def test_whatever_the_client_accepts_it_gets_the_png_or_a_json_error(client, user, accept):
    prediction = heatmap_prediction(user)

    found = client.get(f"/api/v1/images/{prediction.image_id}/heatmap/", HTTP_ACCEPT=accept)
    missing = client.get(f"/api/v1/images/{uuid.uuid4()}/heatmap/", HTTP_ACCEPT=accept)

    assert (found.status_code, found["Content-Type"]) == (200, "image/png")
    assert (missing.status_code, missing["Content-Type"]) == (404, "application/json")
    assert missing.json() == NOT_FOUND


def test_no_heatmap_another_sites_and_unknown_images_are_all_the_same_404(client, user, s3_keys):
    others = heatmap_prediction()  # another site's
    without = PredictionFactory(image__case=CaseFactory(uploaded_by=user))  # no grid
    rejected = RejectedImageFactory(case=CaseFactory(uploaded_by=user))  # no prediction
    # A grid, but the slice to draw it over is not in S3.
    lost = PredictionFactory(image__case=CaseFactory(uploaded_by=user), with_heatmap=True)
    stored = s3_keys()

    for image_id in (others.image_id, without.image_id, rejected.id, lost.image_id, uuid.uuid4()):
        response = client.get(f"/api/v1/images/{image_id}/heatmap/")
        assert (response.status_code, response.json()) == (404, NOT_FOUND), image_id
    assert s3_keys() == stored  # nothing was rendered, another site's heatmap least of all
    assert recorded_key(others) == ""


def test_a_malformed_id_is_the_apis_json_404(client):
    response = client.get("/api/v1/images/not-a-uuid/heatmap/")

    assert response.status_code == 404
    assert response.json() == {"detail": "Not found.", "code": "not_found"}


def test_without_a_token_it_is_401():
    prediction = heatmap_prediction()

    response = APIClient().get(f"/api/v1/images/{prediction.image_id}/heatmap/")

    assert response.status_code == 401
    assert response.json() == {"detail": "Authentication credentials were not provided."}


@pytest.mark.parametrize("viewed_before", [False, True], ids=["first view", "stored"])
def test_storage_down_is_503(client, user, s3_bucket, request, viewed_before):
    prediction = heatmap_prediction(user)
    if viewed_before:
        assert client.get(f"/api/v1/images/{prediction.image_id}/heatmap/").status_code == 200
    key = recorded_key(prediction)
    request.getfixturevalue("s3_down")

    response = client.get(f"/api/v1/images/{prediction.image_id}/heatmap/")

    assert (response.status_code, response["Content-Type"]) == (503, "application/json")
    assert response.json() == UNAVAILABLE
    assert recorded_key(prediction) == key  # "" when it was never rendered
