"""The task's retry and failure decisions, run in-process (Celery eager apply) on the
real database and S3; tests/e2e runs the same task in a real worker process."""

import pytest

from diagnostics import services
from diagnostics.models import Status
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


def test_s3_unreachable_is_retried_then_failed_with_the_cause(
    uploaded_image, use_classifier, tiny_classifier, s3_down, settings
):
    use_classifier(tiny_classifier)

    tasks.classify_image.apply(args=[str(uploaded_image.id)])

    uploaded_image.refresh_from_db()
    retries = settings.CLASSIFY_MAX_RETRIES
    assert uploaded_image.status == Status.FAILED
    assert uploaded_image.attempts == retries + 1
    assert uploaded_image.error.startswith(
        f"gave up after {retries + 1} tries: object storage get_object failed"
    )


class CrashingModel:
    name, version, sha256, runtime = "crash", "0", "0" * 64, "keras"

    def predict(self, images):
        raise RuntimeError("kernel exploded")


def test_a_model_crash_is_retried_then_fails_the_image_with_its_cause(
    uploaded_image, use_classifier, settings
):
    use_classifier(CrashingModel())

    tasks.classify_image.apply(args=[str(uploaded_image.id)])

    uploaded_image.refresh_from_db()
    assert uploaded_image.status == Status.FAILED
    assert uploaded_image.attempts == settings.CLASSIFY_MAX_ATTEMPTS
    assert uploaded_image.error == (
        "classification error: RuntimeError: kernel exploded (after 3 attempts)"
    )
    assert uploaded_image.case.status == Status.FAILED
