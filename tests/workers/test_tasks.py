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


class FakeRequest:
    """What ClassifyBatches reads of a Celery request, and what it does to one."""

    eta = None
    name, delivery_info, hostname, reply_to, correlation_id = "classify_image", {}, "h", None, None
    request_dict: dict = {}

    def __init__(self, image_id):
        self.id, self._payload, self.outcome = image_id, ([image_id], {}, {}), None

    def acknowledge(self):
        self.outcome = "acknowledged"

    def reject(self, requeue):
        self.outcome = "requeued" if requeue else "rejected"


class FakePool:
    num_processes = 1

    def __init__(self):
        self.batches = []  # [(image ids, callback, error callback)]

    def apply_async(self, target, args, callback, error_callback):
        self.batches.append(([r.args[0] for r in args[1][0]], callback, error_callback))


@pytest.fixture
def batches(monkeypatch):
    from queue import Queue

    task = tasks.classify_image
    monkeypatch.setattr(task, "_pool", FakePool())
    monkeypatch.setattr(task, "_buffer", Queue())
    monkeypatch.setattr(task, "_pending", Queue())
    monkeypatch.setattr(task, "_in_flight", 0)
    monkeypatch.setattr(task, "_tref", None)
    return task


def test_a_busy_worker_holds_jobs_back_and_hands_them_over_as_one_batch(batches):
    first, second, third = FakeRequest("a"), FakeRequest("b"), FakeRequest("c")

    batches.flush([first])
    batches.flush([second])  # the pool process is busy: no batch of one queued behind it
    batches.flush([third])
    assert [ids for ids, _, _ in batches._pool.batches] == [["a"]]

    _, acknowledge, _ = batches._pool.batches[0]
    acknowledge(None)  # the first batch finished: the next takes everything waiting

    assert first.outcome == "acknowledged"
    assert [ids for ids, _, _ in batches._pool.batches] == [["a"], ["b", "c"]]


def test_a_batch_whose_pool_process_died_goes_back_to_the_broker(batches):
    request = FakeRequest("a")
    batches.flush([request])

    _, _, give_back = batches._pool.batches[0]
    give_back(RuntimeError("worker lost"))

    assert request.outcome == "requeued"
    assert batches._in_flight == 0


def test_a_batch_takes_at_most_flush_every_jobs(batches, monkeypatch):
    monkeypatch.setattr(batches, "flush_every", 2)
    batches.flush([FakeRequest(name) for name in "abc"])
    assert [ids for ids, _, _ in batches._pool.batches] == [["a", "b"]]
    assert batches._buffer.qsize() == 1


def test_database_down_sends_the_whole_batch_again_with_backoff(
    uploaded_image, use_classifier, tiny_classifier, broker, monkeypatch
):
    from django.db import OperationalError

    use_classifier(tiny_classifier)

    def database_down(**_):
        raise OperationalError("connection refused")

    monkeypatch.setattr(services, "images_classify", database_down)

    tasks.classify_image.apply(args=[str(uploaded_image.id)], kwargs={"retries": 2})

    [job] = _sent(broker)
    assert job["headers"]["argsrepr"] == f"['{uploaded_image.id}']"
    assert job["headers"]["kwargsrepr"] == "{'retries': 3}"
    assert job["headers"]["eta"] is not None


def test_a_pool_process_makes_its_s3_client_before_taking_jobs(monkeypatch, tiny_classifier):
    from diagnostics import storage

    monkeypatch.setattr(tasks, "classifier", lambda: tiny_classifier)
    storage.clients_forget()

    tasks._prepare_before_taking_jobs()

    assert storage._new_client.cache_info().currsize == 1
    assert storage._http.cache_info().currsize == 1


def _backend_pid() -> int:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        return cursor.fetchone()[0]


def _as_a_worker_runs(task, state):
    """The signals a worker sends around a task, and what Celery's Django fixup does then."""
    from celery.fixups.django import DjangoWorkerFixup
    from celery.signals import task_postrun, task_prerun

    fixup = DjangoWorkerFixup(tasks.app)
    fixup.on_task_prerun(sender=task)
    task_prerun.send(sender=task, task_id="t", task=task, args=(), kwargs={})
    fixup.on_task_postrun(sender=task)
    task_postrun.send(sender=task, task_id="t", task=task, args=(), kwargs={}, state=state)


@pytest.mark.django_db(transaction=True)
def test_a_worker_keeps_its_database_connection_for_the_next_task():
    backend = _backend_pid()

    _as_a_worker_runs(tasks.classify_image, "SUCCESS")
    _as_a_worker_runs(tasks.resend_stuck_images, "SUCCESS")

    assert _backend_pid() == backend


@pytest.mark.django_db(transaction=True)
def test_a_task_that_raised_leaves_no_database_connection_to_the_next():
    from django.db import connection

    backend = _backend_pid()

    _as_a_worker_runs(tasks.classify_image, "FAILURE")

    assert connection.connection is None
    assert _backend_pid() != backend


@pytest.mark.django_db(transaction=True)
def test_a_broken_database_connection_is_replaced_before_the_next_task():
    from django.db import connection

    backend = _backend_pid()
    # What a PostgreSQL restart does to it, from another connection.
    other = connection.copy()
    with other.cursor() as cursor:
        cursor.execute("SELECT pg_terminate_backend(%s, 5000)", [backend])
    other.close()

    _as_a_worker_runs(tasks.classify_image, "SUCCESS")

    assert _backend_pid() != backend
