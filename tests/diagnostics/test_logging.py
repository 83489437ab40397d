"""JSON logs carry the case id from the API request through the worker, and no PHI."""

import json
import logging

import pytest
from django.conf import settings
from django.core.files.uploadedfile import SimpleUploadedFile
from rest_framework.test import APIClient

from diagnostics import services
from diagnostics.logging import ContextFilter, JsonFormatter
from tests.factories import UserFactory, token_for
from tests.images import image_bytes
from workers import logs
from workers.tasks import classify_image

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("s3_bucket")]

PATIENT_NAME = "DOE^JOHN"
REFERENCE = "MRN-4711-DOE"


@pytest.fixture
def json_lines(caplog):
    """Every record as the production handler writes it: one JSON object per line."""
    caplog.set_level(logging.INFO)
    formatter, context = JsonFormatter(), ContextFilter()

    def lines():
        return [json.loads(formatter.format(r)) for r in caplog.records if context.filter(r)]

    return lines


def test_production_logging_writes_json():
    handler = settings.LOGGING["handlers"]["console"]
    assert settings.LOG_FORMAT == "json"
    assert settings.LOGGING["formatters"][handler["formatter"]] == {
        "()": "diagnostics.logging.JsonFormatter"
    }


def test_an_upload_logs_one_request_line_with_the_new_case_id_and_no_phi(json_lines):
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {token_for(UserFactory())}")
    upload = SimpleUploadedFile(f"{PATIENT_NAME}_1970.jpg", image_bytes(seed=3))

    response = api.post("/api/v1/cases/", {"images": [upload], "reference": REFERENCE})
    case_id = response.json()["id"]
    detail = api.get(f"/api/v1/cases/{case_id}/?reference={REFERENCE}")

    assert (response.status_code, detail.status_code) == (202, 200)
    requests = [line for line in json_lines() if line["logger"] == "diagnostics.requests"]
    assert [
        {key: line[key] for key in ("message", "method", "route", "status", "case_id")}
        for line in requests
    ] == [
        {
            "message": "POST api/v1/cases/ 202",
            "method": "POST",
            "route": "api/v1/cases/",
            "status": 202,
            "case_id": case_id,
        },
        {
            "message": "GET api/v1/cases/<uuid:case_id>/ 200",
            "method": "GET",
            "route": "api/v1/cases/<uuid:case_id>/",
            "status": 200,
            "case_id": case_id,
        },
    ]
    written = "\n".join(json.dumps(line) for line in json_lines())
    assert PATIENT_NAME not in written and REFERENCE not in written


def test_a_workers_records_carry_the_case_of_the_image_they_are_about(json_lines):
    from tests.diagnostics.services.test_classification import StubClassifier, _uploaded

    [image] = _uploaded()
    worker_logger = logging.getLogger("diagnostics.services.classification")
    crashing = StubClassifier(error=RuntimeError("kernel exploded"))

    logs._enter_job_context(task_id="job-1", task=classify_image, args=[[image.id]])
    services.images_classify(image_ids=[image.id], classifier=crashing)
    logs._leave_job_context(task_id="job-1")
    worker_logger.info("idle")

    working, idle = [line for line in json_lines() if line["logger"] == worker_logger.name]
    assert (working["message"], working["case_id"], working["task_id"]) == (
        f"classifying image {image.id} failed",
        str(image.case_id),
        "job-1",
    )
    assert idle["message"] == "idle" and "case_id" not in idle and "task_id" not in idle


def test_each_result_a_worker_records_is_logged_with_its_case(json_lines):
    from tests.diagnostics.services.test_classification import StubClassifier, _result, _uploaded

    [image] = _uploaded()

    services.images_classify(image_ids=[image.id], classifier=StubClassifier(_result("glioma")))

    [line] = [
        line for line in json_lines() if line["logger"] == "diagnostics.services.classification"
    ]
    assert (line["message"], line["case_id"]) == (
        f"image {image.id} classified: glioma 1.000",
        str(image.case_id),
    )
