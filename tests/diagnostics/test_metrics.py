"""Prometheus metrics: the API's requests (django-prometheus) and what workers record."""

import pytest
from django.test import Client
from prometheus_client import REGISTRY
from rest_framework.test import APIClient

from tests.factories import (
    ImageFactory,
    PredictionFactory,
    RejectedImageFactory,
    UserFactory,
    token_for,
)
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


def test_a_prediction_counts_as_done_with_its_latency_and_a_flagged_one_as_flagged():
    confident = PredictionFactory(
        probabilities={"glioma": 0.9, "meningioma": 0.05, "no_tumor": 0.03, "pituitary": 0.02},
        inference_ms=40.0,
    )
    # The model's own flag counts, not the probability: 0.9 flagged, 0.7 not.
    flagged_90 = PredictionFactory(
        label="pituitary",
        probabilities={"glioma": 0.05, "meningioma": 0.03, "no_tumor": 0.02, "pituitary": 0.9},
        inference_ms=300.0,
        needs_review=True,
    )
    unflagged_70 = PredictionFactory(label="pituitary", inference_ms=30.0)
    done = sample("diagnostics_classify_jobs_total", outcome="done")
    flagged = sample("diagnostics_images_flagged_total", label="pituitary")
    observed = sample("diagnostics_inference_seconds_count")
    under_50ms = sample("diagnostics_inference_seconds_bucket", le="0.05")

    for prediction in (confident, flagged_90, unflagged_70):
        instruments.classified(prediction.image_id, prediction)

    assert sample("diagnostics_classify_jobs_total", outcome="done") == done + 3
    assert sample("diagnostics_images_flagged_total", label="pituitary") == flagged + 1
    assert sample("diagnostics_inference_seconds_count") == observed + 3
    assert sample("diagnostics_inference_seconds_bucket", le="0.05") == under_50ms + 2


def test_no_prediction_is_a_failure_a_rejection_by_reason_or_a_skip():
    failed = ImageFactory(status="failed")
    blank = RejectedImageFactory()
    out_of_distribution = RejectedImageFactory(
        error="not a brain MRI slice: the image is out of the model's training distribution "
        "(score 9120.0 > threshold 7264.9)"
    )
    finished_elsewhere = ImageFactory(status="done")
    jobs_failed = sample("diagnostics_classify_jobs_total", outcome="failed")
    jobs_rejected = sample("diagnostics_classify_jobs_total", outcome="rejected")
    skipped = sample("diagnostics_classify_jobs_total", outcome="skipped")
    by_reason = {
        reason: sample("diagnostics_images_rejected_total", reason=reason)
        for reason in ("blank", "out_of_distribution", "other")
    }

    for image in (failed, blank, out_of_distribution, finished_elsewhere):
        instruments.classified(image.id, None)
    instruments.rejected()  # no reason given

    assert sample("diagnostics_classify_jobs_total", outcome="failed") == jobs_failed + 1
    assert sample("diagnostics_classify_jobs_total", outcome="rejected") == jobs_rejected + 3
    assert sample("diagnostics_classify_jobs_total", outcome="skipped") == skipped + 1
    assert {
        reason: sample("diagnostics_images_rejected_total", reason=reason) - before
        for reason, before in by_reason.items()
    } == {"blank": 1, "out_of_distribution": 1, "other": 1}


def _reasons() -> dict[str, str]:
    """The sentences ml.ood rejects with, from the functions themselves."""
    import numpy as np

    from ml.ood import feature_reason, input_check

    rng = np.random.default_rng(0)
    colour = np.zeros((224, 224, 3), np.uint8)
    colour[:112, :, 0] = 255  # red above black
    return {
        "blank": input_check(np.zeros((224, 224, 3), np.uint8)),
        "colour": input_check(colour),
        "noise": input_check(np.repeat(rng.integers(0, 256, (224, 224, 1)), 3, axis=2)),
        "out_of_distribution": feature_reason(9120.0, 7264.9),
    }


def test_the_models_rejection_reasons_become_a_few_label_values():
    reasons = _reasons()

    assert all(reasons.values())
    assert {kind: instruments.rejection_kind(reason) for kind, reason in reasons.items()} == {
        kind: kind for kind in reasons
    }
    assert instruments.rejection_kind("") == "other"
