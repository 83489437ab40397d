"""File names and study references can carry patient data: they never reach the logs."""

import logging

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from rest_framework.test import APIClient

from diagnostics import services
from tests.factories import UserFactory, token_for
from tests.images import image_bytes

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("s3_bucket")]

PATIENT_NAME = "DOE^JOHN"
REFERENCE = "MRN-4711-DOE"


def test_uploads_failures_and_classification_log_no_names_or_references(
    caplog, tiny_classifier, request
):
    caplog.set_level(logging.DEBUG)
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {token_for(UserFactory())}")
    good = SimpleUploadedFile(f"{PATIENT_NAME}_1970.jpg", image_bytes(seed=1))
    bad = SimpleUploadedFile(f"{PATIENT_NAME}_broken.jpg", b"not an image")

    accepted = api.post("/api/v1/cases/", {"images": [good], "reference": REFERENCE})
    refused = api.post("/api/v1/cases/", {"images": [bad], "reference": REFERENCE})
    image_id = accepted.json()["images"][0]["id"]
    services.image_classify(image_id=image_id, classifier=tiny_classifier)
    request.getfixturevalue("s3_down")  # S3 goes away for the last upload
    unavailable = api.post(
        "/api/v1/cases/",
        {"images": [SimpleUploadedFile(f"{PATIENT_NAME}.jpg", image_bytes(seed=2))]},
    )

    assert (accepted.status_code, refused.status_code, unavailable.status_code) == (202, 400, 503)
    assert caplog.records, "the scenario logged nothing, so the check below would prove nothing"
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert PATIENT_NAME not in logged
    assert REFERENCE not in logged
