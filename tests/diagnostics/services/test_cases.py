import json
from datetime import timedelta

import pytest
from django.conf import settings
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from diagnostics import jobs, services, storage
from diagnostics.errors import InvalidUpload, ServiceUnavailable
from diagnostics.models import Case, Image, Status
from tests.factories import ImageFactory, UserFactory
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


@pytest.mark.django_db(transaction=True)
def test_a_new_case_is_answered_as_written_without_reading_it_back(broker):
    uploads = [("a.jpg", image_bytes(seed=1)), ("b.jpg", image_bytes(seed=2))]
    case, created = services.case_create(user=UserFactory(), uploads=uploads)
    with CaptureQueriesContext(connection) as reads:
        images = case.images.all()
        answered = [(i.status, i.queued_at, getattr(i, "prediction", None)) for i in images]
    assert len(reads) == 0
    assert created and case.status == Status.QUEUED == Case.objects.get(id=case.id).status
    stored = case.images.order_by("position").values_list("status", "queued_at")
    assert answered == [(status, queued_at, None) for status, queued_at in stored]


@pytest.mark.django_db(transaction=True)
def test_a_new_case_a_worker_moved_on_first_is_answered_as_stored(monkeypatch):
    def sent_and_claimed_at_once(image_id):
        Image.objects.filter(id=image_id).update(status=Status.PROCESSING)

    monkeypatch.setattr(jobs, "send_classify", sent_and_claimed_at_once)
    case, created = services.case_create(user=UserFactory(), uploads=[("a.jpg", image_bytes())])
    assert created
    assert [image.status for image in case.images.all()] == [Status.PROCESSING]


def test_enqueue_leaves_images_received_when_the_broker_is_down(monkeypatch):
    image = ImageFactory(status=Status.RECEIVED)

    def broker_down(image_id):
        raise ConnectionError("redis unreachable")

    monkeypatch.setattr(jobs, "send_classify", broker_down)
    assert services.enqueue_images([image.id]) == 0
    image.refresh_from_db()
    assert image.status == Status.RECEIVED


def test_the_sweeper_resends_what_postgres_says_is_stuck(broker):
    old = timezone.now() - timedelta(hours=1)
    never_sent = ImageFactory(status=Status.RECEIVED)
    Image.objects.filter(id=never_sent.id).update(received_at=old)
    lost_in_redis = ImageFactory(status=Status.QUEUED, queued_at=old)
    abandoned = ImageFactory(
        status=Status.PROCESSING,
        processing_started_at=timezone.now()
        - timedelta(seconds=settings.CLASSIFY_TIME_LIMIT_S + 10),
        attempts=1,
    )
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


def test_demo_user_gets_a_site_and_a_stable_token():
    first = services.demo_user_ensure(username="demo", site_name="Demo Hospital")
    again = services.demo_user_ensure(username="demo", site_name="Demo Hospital")
    assert first == again and len(first) == 40
