import uuid

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.db import connection
from django.test.utils import CaptureQueriesContext
from rest_framework.test import APIClient

from diagnostics.models import Case, Status
from tests.factories import CaseFactory, ImageFactory, PredictionFactory, UserFactory, token_for
from tests.images import image_bytes

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("s3_bucket")]


@pytest.fixture
def user():
    return UserFactory()


@pytest.fixture
def client(user):
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {token_for(user)}")
    return api


def jpeg(name="slice.jpg", **kwargs):
    return SimpleUploadedFile(name, image_bytes(**kwargs), content_type="image/jpeg")


def test_upload_is_accepted_with_a_poll_url(client, s3_keys):
    response = client.post(
        "/api/v1/cases/", {"images": [jpeg(seed=1), jpeg(seed=2)], "reference": "study-7"}
    )

    assert response.status_code == 202
    body = response.json()
    assert response["Location"] == body["url"] == f"http://testserver/api/v1/cases/{body['id']}/"
    assert body["reference"] == "study-7"
    assert [image["position"] for image in body["images"]] == [0, 1]
    assert body["images"][0]["prediction"] is None
    assert len(s3_keys()) == 2


def test_poll_returns_the_prediction_with_the_model_that_made_it(client, user):
    prediction = PredictionFactory(image__case=CaseFactory(uploaded_by=user, status=Status.DONE))

    response = client.get(f"/api/v1/cases/{prediction.image.case_id}/")

    assert response.status_code == 200
    image = response.json()["images"][0]
    assert image["status"] == "done"
    assert image["prediction"]["label"] == "glioma"
    assert image["prediction"]["model"] == {
        "name": "tiny-test",
        "version": "0",
        "sha256": "0" * 64,
        "runtime": "keras",
    }
    assert set(image["prediction"]["probabilities"]) == {
        "glioma",
        "meningioma",
        "no_tumor",
        "pituitary",
    }


def test_text_renamed_jpg_is_refused_and_nothing_is_stored(client, s3_keys):
    fake = SimpleUploadedFile("scan.jpg", b"hello, I am text", content_type="image/jpeg")

    response = client.post("/api/v1/cases/", {"images": [fake]})

    assert response.status_code == 400
    assert response.json() == {
        "detail": "'scan.jpg' is not a readable image",
        "code": "invalid_image",
    }
    assert Case.objects.count() == 0
    assert s3_keys() == []


def test_upload_without_images_is_refused(client):
    response = client.post("/api/v1/cases/", {"reference": "x"})
    assert response.status_code == 400
    assert response.json() == {
        "detail": "no images: send one or more files in the 'images' field",
        "code": "invalid_image",
    }


def test_oversized_file_gets_413(client, settings, s3_keys):
    settings.MAX_IMAGE_BYTES = 200
    response = client.post("/api/v1/cases/", {"images": [jpeg()]})
    assert response.status_code == 413
    assert response.json()["code"] == "too_large"
    assert s3_keys() == []


def test_s3_down_gets_503_and_no_case(client, s3_down):
    response = client.post("/api/v1/cases/", {"images": [jpeg()]})
    assert response.status_code == 503
    assert response.json() == {
        "detail": "object storage is unavailable; nothing was stored, retry later",
        "code": "unavailable",
    }
    assert Case.objects.count() == 0


def test_a_user_without_a_site_cannot_upload():
    from django.contrib.auth import get_user_model

    lonely = get_user_model().objects.create_user("lonely")
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {token_for(lonely)}")
    response = api.post("/api/v1/cases/", {"images": [jpeg()]})
    assert response.status_code == 403
    assert response.json()["code"] == "no_site"


def test_unauthenticated_requests_get_401():
    response = APIClient().get("/api/v1/cases/")
    assert response.status_code == 401
    assert response.json() == {"detail": "Authentication credentials were not provided."}


def test_another_sites_case_is_not_found(client):
    other = CaseFactory()
    response = client.get(f"/api/v1/cases/{other.id}/")
    assert response.status_code == 404
    assert response.json() == {"detail": "Not found."}


def test_unknown_case_is_not_found_like_another_sites(client):
    response = client.get(f"/api/v1/cases/{uuid.uuid4()}/")
    assert response.status_code == 404
    assert response.json() == {"detail": "Not found."}


def test_list_shows_only_own_site_newest_first(client, user):
    colleague = UserFactory(site=user.site_membership.site)
    older = CaseFactory(uploaded_by=user)
    newer = CaseFactory(uploaded_by=colleague)
    CaseFactory()  # another site's

    response = client.get("/api/v1/cases/")

    assert response.status_code == 200
    assert [case["id"] for case in response.json()["results"]] == [str(newer.id), str(older.id)]


def test_list_filters_by_status(client, user):
    done = CaseFactory(uploaded_by=user, status=Status.DONE)
    CaseFactory(uploaded_by=user, status=Status.QUEUED)

    response = client.get("/api/v1/cases/", {"status": "done"})

    assert [case["id"] for case in response.json()["results"]] == [str(done.id)]


def test_list_refuses_an_unknown_status(client):
    response = client.get("/api/v1/cases/", {"status": "'; drop table cases;--"})
    assert response.status_code == 400
    assert response.json() == {"status": ['"\'; drop table cases;--" is not a valid choice.']}


def test_list_is_paginated_with_a_cursor(client, user):
    for _ in range(3):
        CaseFactory(uploaded_by=user)

    first = client.get("/api/v1/cases/", {"page_size": 2}).json()
    second = client.get(first["next"]).json()

    assert len(first["results"]) == 2 and len(second["results"]) == 1
    assert second["next"] is None


def test_list_query_count_does_not_grow_with_cases_or_images(client, user):
    for _ in range(5):
        case = CaseFactory(uploaded_by=user)
        PredictionFactory(image__case=case)
        ImageFactory(case=case)

    with CaptureQueriesContext(connection) as queries:
        response = client.get("/api/v1/cases/")

    assert response.status_code == 200 and len(response.json()["results"]) == 5
    # token+user, cases, images with their predictions
    assert len(queries) == 3


def test_a_repeated_upload_returns_the_existing_case_with_200(client):
    first = client.post("/api/v1/cases/", {"images": [jpeg(seed=5)]}, HTTP_IDEMPOTENCY_KEY="abc")
    again = client.post("/api/v1/cases/", {"images": [jpeg(seed=5)]}, HTTP_IDEMPOTENCY_KEY="abc")
    same_bytes = client.post("/api/v1/cases/", {"images": [jpeg(seed=5)]})

    assert (first.status_code, again.status_code, same_bytes.status_code) == (202, 200, 200)
    assert first.json()["id"] == again.json()["id"] == same_bytes.json()["id"]
    assert again["Location"] == first["Location"]


def test_an_idempotency_key_reused_for_other_images_gets_422(client):
    client.post("/api/v1/cases/", {"images": [jpeg(seed=5)]}, HTTP_IDEMPOTENCY_KEY="abc")
    response = client.post("/api/v1/cases/", {"images": [jpeg(seed=6)]}, HTTP_IDEMPOTENCY_KEY="abc")
    assert response.status_code == 422
    assert response.json() == {
        "detail": "this Idempotency-Key was already used for a different upload",
        "code": "idempotency_key_reused",
    }


@pytest.mark.django_db(transaction=True)
def test_the_answer_to_an_upload_is_the_case_as_stored(client, broker):
    # Committed for real: the job is sent and the case queued before the view answers.
    response = client.post("/api/v1/cases/", {"images": [jpeg(seed=1), jpeg(seed=2)]})

    assert response.status_code == 202
    body = response.json()
    assert body["status"] == "queued"
    assert [image["status"] for image in body["images"]] == ["queued", "queued"]
    assert body == client.get(response["Location"]).json()


def test_an_upload_costs_a_fixed_number_of_queries(
    client, broker, django_capture_on_commit_callbacks
):
    client.post("/api/v1/cases/", {"images": [jpeg(seed=0)]})  # the first loads the caches

    with CaptureQueriesContext(connection) as queries:
        with django_capture_on_commit_callbacks(execute=True):
            response = client.post("/api/v1/cases/", {"images": [jpeg(seed=1)]})

    assert response.status_code == 202
    # The token with the user's site (1), the user's permissions (1), the duplicate check
    # (1), the case, its image and its audit event in one transaction (5), and marking them
    # queued once the job is sent (5); the answer is built from what was written.
    assert len(queries) == 13
    assert broker.llen("classify") == 1  # the first upload's job was never sent (no commit)
    assert Case.objects.get(id=response.json()["id"]).status == Status.QUEUED
