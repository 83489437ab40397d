import json
from datetime import timedelta
from types import SimpleNamespace

import pytest
from django.conf import settings
from django.utils import timezone

from diagnostics import jobs, services, storage
from diagnostics.errors import InvalidUpload, ServiceUnavailable
from diagnostics.models import Case, Image, Prediction, Status
from tests.factories import CaseFactory, ImageFactory, UserFactory
from tests.images import image_bytes

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("s3_bucket")]


def test_case_create_stores_each_slice_in_s3_and_queues_a_job_after_commit(broker, s3_keys):
    user = UserFactory()
    uploads = [("a.jpg", image_bytes(seed=1)), ("b.png", image_bytes(format="PNG", seed=2))]

    case, _ = services.case_create(user=user, uploads=uploads, reference="study-1")

    images = list(case.images.order_by("position"))
    assert [image.original_name for image in images] == ["a.jpg", "b.png"]
    assert [image.content_type for image in images] == ["image/jpeg", "image/png"]
    assert sorted(s3_keys()) == sorted(image.s3_key for image in images)
    assert storage.get(images[0].s3_key) == uploads[0][1]
    # The pytest-django transaction is never committed, so no job has been sent yet.
    assert broker.llen("classify") == 0
    assert {image.status for image in images} == {Status.RECEIVED}


def test_object_keys_are_generated_by_the_server_not_from_the_file_name():
    case, _ = services.case_create(
        user=UserFactory(), uploads=[("../../etc/passwd.jpg", image_bytes())]
    )
    image = case.images.get()
    assert image.s3_key == f"scans/{case.id}/{image.id}"
    assert image.original_name == "../../etc/passwd.jpg"


def test_one_bad_file_refuses_the_whole_case_and_stores_nothing(s3_keys):
    uploads = [("good.jpg", image_bytes()), ("bad.jpg", b"not an image")]
    with pytest.raises(InvalidUpload):
        services.case_create(user=UserFactory(), uploads=uploads)
    assert Case.objects.count() == 0
    assert s3_keys() == []


def test_s3_unavailable_refuses_the_upload_with_no_row(s3_down):
    with pytest.raises(ServiceUnavailable) as refused:
        services.case_create(user=UserFactory(), uploads=[("a.jpg", image_bytes())])
    assert refused.value.detail == "object storage is unavailable; nothing was stored, retry later"
    assert Case.objects.count() == 0 and Image.objects.count() == 0


@pytest.mark.django_db(transaction=True)
def test_jobs_are_sent_after_commit_and_images_become_queued(broker):
    case, _ = services.case_create(user=UserFactory(), uploads=[("a.jpg", image_bytes())] * 2)

    assert broker.llen("classify") == 2
    assert set(case.images.values_list("status", flat=True)) == {Status.QUEUED}
    assert Case.objects.get(id=case.id).status == Status.QUEUED


def test_enqueue_leaves_images_received_when_the_broker_is_down(monkeypatch):
    image = ImageFactory(status=Status.RECEIVED)

    def broker_down(image_id):
        raise ConnectionError("redis unreachable")

    monkeypatch.setattr(jobs, "send_classify", broker_down)
    assert services.enqueue_images([image.id]) == 0
    image.refresh_from_db()
    assert image.status == Status.RECEIVED


def test_claim_is_guarded_so_only_one_worker_processes_an_image():
    image = ImageFactory(status=Status.QUEUED)

    first = services.image_claim(image.id)
    second = services.image_claim(image.id)

    assert first.image.status == Status.PROCESSING and first.image.attempts == 1
    assert second.image is None
    # The second worker is told to look again when the first claim's lease runs out.
    assert 0 < second.retry_in_s <= settings.CLASSIFY_TIME_LIMIT_S + services.cases.CLAIM_MARGIN_S


def _abandoned_claim(attempts):
    stale = timezone.now() - timedelta(seconds=settings.CLASSIFY_TIME_LIMIT_S + 10)
    return ImageFactory(status=Status.PROCESSING, processing_started_at=stale, attempts=attempts)


def test_a_claim_abandoned_by_a_dead_worker_is_taken_over():
    claim = services.image_claim(_abandoned_claim(attempts=1).id)
    assert claim.image.attempts == 2


def test_an_image_that_keeps_killing_workers_fails_with_the_cause():
    image = _abandoned_claim(attempts=settings.CLASSIFY_MAX_ATTEMPTS)

    claim = services.image_claim(image.id)

    assert claim == services.Claim()
    image.refresh_from_db()
    assert image.status == Status.FAILED
    assert image.error == (
        "a worker stopped while classifying this image 3 times; the image may crash the model"
    )
    assert image.case.status == Status.FAILED


@pytest.mark.parametrize("status", [Status.DONE, Status.FAILED])
def test_finished_images_are_never_claimed_again(status):
    assert services.image_claim(ImageFactory(status=status).id) == services.Claim()


def test_a_model_error_releases_the_image_until_its_attempts_are_used():
    image = ImageFactory(status=Status.QUEUED)
    services.image_claim(image.id)

    assert services.image_attempt_failed(image.id, "classification error: boom") is True
    image.refresh_from_db()
    assert image.status == Status.QUEUED

    Image.objects.filter(id=image.id).update(attempts=settings.CLASSIFY_MAX_ATTEMPTS)
    services.image_claim(image.id)
    assert services.image_attempt_failed(image.id, "classification error: boom") is False
    image.refresh_from_db()
    assert image.status == Status.FAILED
    assert image.error == "classification error: boom (after 3 attempts)"


def test_the_sweeper_resends_what_postgres_says_is_stuck(broker):
    old = timezone.now() - timedelta(hours=1)
    never_sent = ImageFactory(status=Status.RECEIVED)
    Image.objects.filter(id=never_sent.id).update(received_at=old)
    lost_in_redis = ImageFactory(status=Status.QUEUED, queued_at=old)
    abandoned = _abandoned_claim(attempts=1)
    ImageFactory(status=Status.QUEUED, queued_at=timezone.now())  # waiting normally
    ImageFactory(status=Status.DONE)

    assert services.images_resend_stuck() == 3

    sent = {
        json.loads(message)["headers"]["argsrepr"] for message in broker.lrange("classify", 0, -1)
    }
    assert sent == {f"['{image.id}']" for image in (never_sent, lost_in_redis, abandoned)}
    never_sent.refresh_from_db()
    lost_in_redis.refresh_from_db()
    assert never_sent.status == Status.QUEUED
    assert lost_in_redis.queued_at > old
    # Nothing is sent twice by the next sweep.
    assert services.images_resend_stuck() == 1  # only the abandoned claim, until a worker takes it


def _classifier():
    return SimpleNamespace(name="tiny-test", version="0", sha256="a" * 64, runtime="keras")


def _result(label="glioma"):
    probabilities = dict.fromkeys(("glioma", "meningioma", "no_tumor", "pituitary"), 0.0)
    probabilities[label] = 1.0
    return SimpleNamespace(label=label, probabilities=probabilities)


def test_prediction_is_recorded_once_even_if_the_job_runs_twice():
    image = ImageFactory(status=Status.PROCESSING)

    first = services.prediction_record(
        image_id=image.id, result=_result(), classifier=_classifier(), inference_ms=3.0
    )
    second = services.prediction_record(
        image_id=image.id, result=_result("pituitary"), classifier=_classifier(), inference_ms=4.0
    )

    assert first.pk == second.pk
    assert Prediction.objects.get().label == "glioma"
    image.refresh_from_db()
    assert image.status == Status.DONE and image.finished_at is not None


def test_case_status_is_derived_from_its_images():
    case = CaseFactory()
    first, second = ImageFactory(case=case), ImageFactory(case=case)
    services.image_claim(first.id)
    assert Case.objects.get(id=case.id).status == Status.PROCESSING

    services.prediction_record(
        image_id=first.id, result=_result(), classifier=_classifier(), inference_ms=1.0
    )
    assert Case.objects.get(id=case.id).status == Status.PROCESSING

    services.image_fail(second.id, "broken")
    case.refresh_from_db()
    assert case.status == Status.DONE and case.completed_at is not None


def test_a_case_whose_images_all_failed_is_failed():
    image = ImageFactory()
    services.image_fail(image.id, "the model could not read the image")
    image.refresh_from_db()
    assert image.case.status == Status.FAILED
    assert image.error == "the model could not read the image"


def test_image_classify_runs_the_real_model_and_records_its_version(tiny_classifier):
    case, _ = services.case_create(user=UserFactory(), uploads=[("a.jpg", image_bytes())])
    image = case.images.get()

    prediction = services.image_classify(image_id=image.id, classifier=tiny_classifier)

    assert prediction.label in ("glioma", "meningioma", "no_tumor", "pituitary")
    assert sum(prediction.probabilities.values()) == pytest.approx(1.0, abs=1e-4)
    assert (prediction.model_name, prediction.model_version) == ("tiny-test", "0")
    assert services.image_classify(image_id=image.id, classifier=tiny_classifier) is None


def test_demo_user_gets_a_site_and_a_stable_token():
    first = services.demo_user_ensure(username="demo", site_name="Demo Hospital")
    again = services.demo_user_ensure(username="demo", site_name="Demo Hospital")
    assert first == again and len(first) == 40
