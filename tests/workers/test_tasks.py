"""The task's retry and failure decisions, run in-process (Celery eager apply) on the
real database and S3; tests/e2e runs the same task in a real worker process."""

import json

import pytest
from celery_batches import SimpleRequest

from diagnostics import services
from diagnostics.models import Image, Status
from tests.factories import UserFactory
from tests.images import image_bytes
from workers import tasks

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("s3_bucket")]


@pytest.fixture
def uploaded_image():
    case, _ = services.case_create(user=UserFactory(), uploads=[("a.jpg", image_bytes())])
    return case.images.get()


@pytest.fixture
def use_classifier(monkeypatch):
    def use(classifier):
        monkeypatch.setattr(tasks, "classifier", lambda: classifier)

    return use


def test_task_classifies_and_a_second_delivery_changes_nothing(
    uploaded_image, use_classifier, tiny_classifier
):
    use_classifier(tiny_classifier)

    tasks.classify_image.apply(args=[str(uploaded_image.id)])
    tasks.classify_image.apply(args=[str(uploaded_image.id)])

    uploaded_image.refresh_from_db()
    assert uploaded_image.status == Status.DONE
    assert uploaded_image.attempts == 1
    assert uploaded_image.prediction.model_name == "tiny-test"


def _sent(broker):
    return [json.loads(message) for message in broker.lrange("classify", 0, -1)]


def test_s3_unreachable_sends_the_job_again_with_backoff(
    uploaded_image, use_classifier, tiny_classifier, s3_down, broker
):
    use_classifier(tiny_classifier)

    tasks.classify_image.apply(args=[str(uploaded_image.id)])

    uploaded_image.refresh_from_db()
    assert uploaded_image.status == Status.QUEUED
    [job] = _sent(broker)
    assert job["headers"]["argsrepr"] == f"['{uploaded_image.id}']"
    assert job["headers"]["kwargsrepr"] == "{'retries': 1}"
    assert job["headers"]["eta"] is not None


def test_s3_unreachable_fails_the_image_with_the_cause_after_the_last_retry(
    uploaded_image, use_classifier, tiny_classifier, s3_down, settings, broker
):
    use_classifier(tiny_classifier)
    retries = settings.CLASSIFY_MAX_RETRIES

    tasks.classify_image.apply(args=[str(uploaded_image.id)], kwargs={"retries": retries})

    uploaded_image.refresh_from_db()
    assert uploaded_image.status == Status.FAILED
    assert uploaded_image.error.startswith(
        f"gave up after {retries + 1} tries: object storage get_object failed"
    )
    assert broker.llen("classify") == 0


class CrashingModel:
    name, version, sha256, runtime, input_size, batches_calls = (
        "crash",
        "0",
        "0" * 64,
        "x",
        32,
        False,
    )

    def analyse_batch(self, batch):
        raise RuntimeError("kernel exploded")


def test_a_model_crash_is_retried_then_fails_the_image_with_its_cause(
    uploaded_image, use_classifier, settings, broker
):
    use_classifier(CrashingModel())

    for attempt in range(settings.CLASSIFY_MAX_ATTEMPTS):
        tasks.classify_image.apply(args=[str(uploaded_image.id)])
        assert broker.llen("classify") == (attempt < settings.CLASSIFY_MAX_ATTEMPTS - 1)
        broker.delete("classify")

    uploaded_image.refresh_from_db()
    assert uploaded_image.status == Status.FAILED
    assert uploaded_image.attempts == settings.CLASSIFY_MAX_ATTEMPTS
    assert uploaded_image.error == (
        "classification error: RuntimeError: kernel exploded (after 3 attempts)"
    )
    assert uploaded_image.case.status == Status.FAILED


def test_an_image_another_worker_holds_is_looked_at_again_when_its_lease_ends(
    uploaded_image, use_classifier, tiny_classifier, broker
):
    use_classifier(tiny_classifier)
    services.images_claim([uploaded_image.id])

    tasks.classify_image.apply(args=[str(uploaded_image.id)])

    [job] = _sent(broker)
    assert job["headers"]["argsrepr"] == f"['{uploaded_image.id}']"
    assert job["headers"]["eta"] is not None


def test_a_batch_of_jobs_is_classified_together(use_classifier, tiny_classifier):
    use_classifier(tiny_classifier)
    user = UserFactory()
    ids = [
        str(services.case_create(user=user, uploads=[("a.jpg", image_bytes(seed=seed))])[0]
            .images.get().id)
        for seed in range(3)
    ]  # fmt: skip
    requests = [
        SimpleRequest(
            id=str(index),
            name="classify_image",
            args=[image_id],
            kwargs={},
            delivery_info={},
            hostname="test",
            ignore_result=True,
            reply_to=None,
            correlation_id=None,
            request_dict={},
        )  # fmt: skip
        for index, image_id in enumerate(ids)
    ]

    tasks.classify_image(requests)

    assert set(Image.objects.filter(id__in=ids).values_list("status", flat=True)) == {Status.DONE}
