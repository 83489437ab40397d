"""The workers' batches: claims, results and case statuses, on the real database and S3."""

from datetime import timedelta

import numpy as np
import pytest
from django.conf import settings
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from diagnostics import services, storage
from diagnostics.models import AuditEvent, Case, Image, Prediction, Status
from diagnostics.services import classification
from ml.inference import Prediction as ModelPrediction
from tests.factories import CaseFactory, ImageFactory, UserFactory
from tests.images import image_bytes

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("s3_bucket")]

CLASSES = ("glioma", "meningioma", "no_tumor", "pituitary")


class StubClassifier:
    """Answers every image with `result` (or raises `error`), like ml.inference.Classifier."""

    name, version, sha256, runtime, input_size, batches_calls = (
        "stub",
        "0",
        "0" * 64,
        "x",
        32,
        False,
    )

    def __init__(self, result=None, error=None):
        self.result, self.error, self.calls = result, error, 0

    def analyse_batch(self, batch):
        self.calls += 1
        if self.error is not None:
            raise self.error
        return [self.result] * len(batch)


def _result(label="glioma", *, heatmap=None, rejection_reason="", needs_review=False):
    probabilities = dict.fromkeys(CLASSES, 0.0)
    probabilities[label] = 1.0
    return ModelPrediction(
        label=label,
        probabilities=probabilities,
        heatmap=heatmap,
        ood_score=12.5,
        rejection_reason=rejection_reason,
        needs_review=needs_review,
    )


def _uploaded(count=1, user=None):
    """`count` images, each its own case, as the API stores them."""
    user = user or UserFactory()
    images = []
    for seed in range(count):
        case, _ = services.case_create(user=user, uploads=[("a.jpg", image_bytes(seed=seed))])
        images.append(case.images.get())
    return images


def _stale():
    return timezone.now() - timedelta(seconds=settings.CLASSIFY_TIME_LIMIT_S + 10)


def test_a_claim_is_guarded_so_only_one_worker_processes_an_image():
    image = ImageFactory(status=Status.QUEUED)

    first = services.images_claim([image.id])
    second = services.images_claim([image.id])

    assert [claimed.id for claimed in first.claimed] == [image.id]
    assert first.claimed[0].attempts == 1
    assert second.claimed == []
    # The second worker is told to look again when the first claim's lease runs out.
    assert 0 < second.busy[str(image.id)] <= classification.lease().total_seconds()


def test_a_claim_abandoned_by_a_dead_worker_is_taken_over():
    image = ImageFactory(status=Status.PROCESSING, processing_started_at=_stale(), attempts=1)
    [claimed] = services.images_claim([image.id]).claimed
    assert claimed.attempts == 2


def test_an_image_that_keeps_killing_workers_fails_with_the_cause():
    image = ImageFactory(
        status=Status.PROCESSING,
        processing_started_at=_stale(),
        attempts=settings.CLASSIFY_MAX_ATTEMPTS,
    )

    claims = services.images_claim([image.id])

    assert claims.claimed == [] and claims.busy == {}
    image.refresh_from_db()
    assert image.status == Status.FAILED
    assert image.error == (
        "a worker stopped while classifying this image 3 times; the image may crash the model"
    )
    assert image.case.status == Status.FAILED


@pytest.mark.parametrize("status", [Status.DONE, Status.FAILED, Status.REJECTED])
def test_finished_images_are_never_claimed_again(status):
    claims = services.images_claim([ImageFactory(status=status).id])
    assert claims.claimed == [] and claims.busy == {}


def test_a_batch_records_each_prediction_once_even_if_it_runs_twice(tiny_classifier):
    images = _uploaded(3)
    ids = [image.id for image in images]

    first = services.images_classify(image_ids=ids, classifier=tiny_classifier)
    second = services.images_classify(image_ids=ids, classifier=tiny_classifier)

    assert sorted(first.predictions) == sorted(str(i) for i in ids)
    assert second.predictions == {} and sorted(second.skipped) == sorted(str(i) for i in ids)
    assert Prediction.objects.count() == 3
    for image in Image.objects.filter(id__in=ids):
        assert image.status == Status.DONE and image.attempts == 1
        assert image.case.status == Status.DONE and image.case.completed_at is not None
        assert image.prediction.model_name == "tiny-test"
    assert AuditEvent.objects.filter(action="prediction.recorded").count() == 3


def test_database_round_trips_are_per_batch_not_per_image():
    stub = StubClassifier(_result())

    def queries_for(count):
        ids = [image.id for image in _uploaded(count)]
        with CaptureQueriesContext(connection) as queries:
            outcome = services.images_classify(image_ids=ids, classifier=stub)
        assert len(outcome.predictions) == count
        return len(queries)

    assert queries_for(1) == queries_for(8) == 19
    # Results are recorded 8 at a time as they come (the last ones together): one more
    # record transaction per 8 results.
    assert queries_for(9) == queries_for(16) == 19 + 11
    assert queries_for(32) == 19 + 3 * 11


def test_a_prediction_keeps_the_flags_and_the_heatmap_grid():
    [image] = _uploaded()
    heatmap = np.zeros((7, 7), np.float32)
    heatmap[2, 3] = 1.0
    stub = StubClassifier(_result("pituitary", heatmap=heatmap, needs_review=True))

    services.images_classify(image_ids=[image.id], classifier=stub)

    prediction = Prediction.objects.get(image=image)
    assert (prediction.label, prediction.needs_review, prediction.ood_score) == (
        "pituitary",
        True,
        12.5,
    )
    assert prediction.heatmap[2][3] == 1.0 and prediction.heatmap[0][0] == 0.0
    # The worker stores no overlay: it is rendered from the grid when first asked for.
    assert prediction.heatmap_key == ""
    assert not storage.exists(services.heatmap_key_for(image))


def test_an_image_that_is_not_a_brain_mri_is_rejected_without_a_label():
    [image] = _uploaded()
    reason = "not a brain MRI slice: the image is blank"
    stub = StubClassifier(_result(rejection_reason=reason))

    outcome = services.images_classify(image_ids=[image.id], classifier=stub)

    assert outcome.rejected == {str(image.id): reason} and outcome.predictions == {}
    image.refresh_from_db()
    assert (image.status, image.error, image.ood_score) == (Status.REJECTED, reason, 12.5)
    assert not Prediction.objects.exists()
    assert image.case.status == Status.REJECTED
    assert AuditEvent.objects.filter(action="image.rejected", object_id=str(image.id)).exists()


def test_unreadable_bytes_fail_the_image_with_the_cause():
    [image] = _uploaded()
    storage.put(image.s3_key, b"not an image", content_type="image/jpeg", sha256="0")

    outcome = services.images_classify(image_ids=[image.id], classifier=StubClassifier(_result()))

    image.refresh_from_db()
    assert image.status == Status.FAILED
    assert image.error.startswith("the model could not read the image: ")
    assert outcome.failed == {str(image.id): image.error}


def test_s3_unreachable_releases_the_image_for_another_try(s3_down):
    image = ImageFactory(status=Status.QUEUED)

    outcome = services.images_classify(image_ids=[image.id], classifier=StubClassifier(_result()))

    assert list(outcome.transient) == [str(image.id)]
    assert outcome.transient[str(image.id)].startswith("object storage get_object failed")
    image.refresh_from_db()
    assert image.status == Status.QUEUED and image.attempts == 1


def test_a_model_error_releases_the_image_until_its_attempts_are_used():
    [image] = _uploaded()
    crashing = StubClassifier(error=RuntimeError("kernel exploded"))

    outcome = services.images_classify(image_ids=[image.id], classifier=crashing)
    assert outcome.model_errors == {
        str(image.id): "classification error: RuntimeError: kernel exploded"
    }
    image.refresh_from_db()
    assert image.status == Status.QUEUED

    Image.objects.filter(id=image.id).update(attempts=settings.CLASSIFY_MAX_ATTEMPTS - 1)
    outcome = services.images_classify(image_ids=[image.id], classifier=crashing)
    assert outcome.model_errors == {}
    image.refresh_from_db()
    assert image.status == Status.FAILED
    assert image.error == "classification error: RuntimeError: kernel exploded (after 3 attempts)"


def test_one_bad_input_in_a_batched_call_does_not_fail_the_others():
    images = _uploaded(3)

    class FailsOnBatches(StubClassifier):
        batches_calls = True

        def analyse_batch(self, batch):
            if len(batch) > 1:
                raise RuntimeError("out of memory")
            return [_result()]

    outcome = services.images_classify(
        image_ids=[image.id for image in images], classifier=FailsOnBatches()
    )

    assert len(outcome.predictions) == 3


def test_the_case_status_is_derived_from_its_images(tiny_classifier):
    user = UserFactory()
    case, _ = services.case_create(
        user=user, uploads=[("a.jpg", image_bytes(seed=1)), ("b.jpg", image_bytes(seed=2))]
    )
    first, second = case.images.order_by("position")

    services.images_classify(image_ids=[first.id], classifier=tiny_classifier)
    assert Case.objects.get(id=case.id).status == Status.PROCESSING

    services.image_fail(second.id, "broken")
    case.refresh_from_db()
    assert case.status == Status.DONE and case.completed_at is not None
    changes = AuditEvent.objects.filter(action="case.status_changed", case_id=case.id)
    assert [event.changes["status"][1] for event in changes.order_by("id")] == [
        Status.PROCESSING,
        Status.DONE,
    ]


@pytest.mark.parametrize(
    ("counts", "expected"),
    [
        ({}, Status.RECEIVED),
        ({Status.QUEUED: 2}, Status.QUEUED),
        ({Status.QUEUED: 1, Status.DONE: 1}, Status.PROCESSING),
        ({Status.DONE: 1, Status.REJECTED: 1, Status.FAILED: 1}, Status.DONE),
        ({Status.REJECTED: 1, Status.FAILED: 1}, Status.REJECTED),
        ({Status.FAILED: 2}, Status.FAILED),
    ],
)
def test_derived_status(counts, expected):
    assert classification.derived_status(counts) == expected


def test_a_case_whose_images_all_failed_is_failed():
    image = ImageFactory(case=CaseFactory())
    services.image_fail(image.id, "the model could not read the image")
    image.refresh_from_db()
    assert image.case.status == Status.FAILED
    assert image.error == "the model could not read the image"
