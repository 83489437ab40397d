"""Prometheus metrics: the API's requests (django-prometheus) and what workers record."""

import pytest
from django.test import Client
from prometheus_client import REGISTRY
from rest_framework.test import APIClient

from tests.factories import ImageFactory, PredictionFactory, UserFactory, token_for
from workers import instruments

pytestmark = pytest.mark.django_db


def sample(name, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_api_requests_are_counted_by_view_method_and_status():
    labels = {"view": "case-list", "method": "GET"}
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {token_for(UserFactory())}")
    before = sample(
        "django_http_responses_total_by_status_view_method_total", status="200", **labels
    )

    assert api.get("/api/v1/cases/").status_code == 200
    body = Client().get("/metrics").content.decode()

    after = sample(
        "django_http_responses_total_by_status_view_method_total", status="200", **labels
    )
    assert after == before + 1
    assert "django_http_requests_latency_seconds_by_view_method_bucket" in body
    assert 'view="case-list"' in body


def test_a_prediction_counts_as_done_with_its_latency_and_a_low_confidence_one_is_flagged(settings):
    settings.REVIEW_CONFIDENCE_THRESHOLD = 0.8
    confident = PredictionFactory(
        probabilities={"glioma": 0.9, "meningioma": 0.05, "no_tumor": 0.03, "pituitary": 0.02},
        inference_ms=40.0,
    )
    doubtful = PredictionFactory(label="pituitary", inference_ms=300.0)  # 0.7 < 0.8
    done = sample("diagnostics_classify_jobs_total", outcome="done")
    flagged = sample("diagnostics_images_flagged_total", label="pituitary")
    observed = sample("diagnostics_inference_seconds_count")
    under_50ms = sample("diagnostics_inference_seconds_bucket", le="0.05")

    instruments.classified(confident.image_id, confident)
    instruments.classified(doubtful.image_id, doubtful)

    assert sample("diagnostics_classify_jobs_total", outcome="done") == done + 2
    assert sample("diagnostics_images_flagged_total", label="pituitary") == flagged + 1
    assert sample("diagnostics_inference_seconds_count") == observed + 2
    assert sample("diagnostics_inference_seconds_bucket", le="0.05") == under_50ms + 1


def test_no_prediction_is_a_rejection_when_the_image_failed_and_a_skip_otherwise():
    failed = ImageFactory(status="failed")
    finished_elsewhere = ImageFactory(status="done")
    rejected = sample("diagnostics_images_rejected_total")
    skipped = sample("diagnostics_classify_jobs_total", outcome="skipped")

    instruments.classified(failed.id, None)
    instruments.classified(finished_elsewhere.id, None)

    assert sample("diagnostics_images_rejected_total") == rejected + 1
    assert sample("diagnostics_classify_jobs_total", outcome="skipped") == skipped + 1
