"""Thin tasks: they take ids, call services, and decide only about retries."""

import functools
import logging
import threading

import django

django.setup()

from celery import states  # noqa: E402
from celery.signals import (  # noqa: E402
    task_postrun,
    task_prerun,
    worker_process_init,
    worker_ready,
)
from celery_batches import Batches, SimpleRequest  # noqa: E402
from celery_batches.trace import apply_batches_task  # noqa: E402
from django.conf import settings  # noqa: E402
from django.db import DatabaseError, close_old_connections, connections  # noqa: E402

from diagnostics import jobs, services, storage  # noqa: E402
from workers import instruments  # noqa: E402
from workers.app import CLASSIFY_QUEUE, app  # noqa: E402

logger = logging.getLogger(__name__)

_loading = threading.Lock()


def classifier():
    """The model, loaded and warmed up once per worker process; with `--pool threads` the
    threads share it (the lock keeps two first jobs from loading it twice)."""
    with _loading:
        return _loaded_classifier()


@functools.cache
def _loaded_classifier():
    from ml.inference import load_classifier

    model = load_classifier(settings.MODEL_DIR or None, runtime=settings.MODEL_RUNTIME)
    # The first call allocates the runtime's tensors (LiteRT) or traces the graph
    # (TensorFlow): pay for it here, not in the first job's latency.
    model.warm_up()
    logger.info("loaded model %s %s (%s)", model.name, model.version, model.runtime)
    return model


def classifies() -> bool:
    """Whether this worker takes classification jobs: one started with `-Q celery` (the
    housekeeping queue only) needs no model, so it loads none."""
    return CLASSIFY_QUEUE in app.amqp.queues.consume_from


@worker_process_init.connect
def _prepare_before_taking_jobs(**_):
    if classifies():
        classifier()
        # The first batch's fetches would otherwise make the S3 client (0.2 s) while its
        # jobs wait.
        storage.connect()


@worker_ready.connect
def _load_model_in_a_threads_pool(**_):
    # Prefork pool processes load it in worker_process_init; a threads pool runs jobs in
    # this process, which sends no such signal: load it here and report ready the same way.
    if settings.CELERY_WORKER_POOL == "threads":
        from workers.health import _ready_once_the_model_is_loaded

        _prepare_before_taking_jobs()
        _ready_once_the_model_is_loaded()


def _in_a_worker(task) -> bool:
    # An eager task runs inside its caller (a test's transaction): its connection is not ours.
    return not getattr(task.request, "is_eager", False)


@task_prerun.connect
def _drop_an_expired_or_broken_database_connection(sender=None, **_):
    if _in_a_worker(sender):
        close_old_connections()


@task_postrun.connect
def _keep_the_database_connection_unless_the_task_raised(sender=None, state=None, **_):
    # Celery's fixup no longer closes it after each task (CELERY_DB_REUSE_MAX, workers.app).
    # An exception, a time limit's included, may have left it mid-query: never reuse that.
    if not _in_a_worker(sender):
        return
    if state == states.SUCCESS:
        close_old_connections()
    else:
        connections.close_all()


def _backoff_s(retries: int) -> int:
    # 2, 4, 8, ... seconds, capped at a minute.
    return min(2 ** (retries + 1), 60)


class ClassifyBatches(Batches):
    """celery-batches' Batches with three changes:

    - a batch is handed to the pool only when a pool process is free, and then takes
      everything waiting (up to flush_every): flushing on every timer tick would queue many
      tiny batches behind a busy process, each paying the per-batch cost, so a busy worker
      would fall further behind instead of batching more;
    - its jobs are acknowledged once it ran;
    - they are given back to the broker when its pool process died or was killed at the
      time limit (what task_acks_late and task_reject_on_worker_lost do for plain tasks;
      Batches has no such path, so the jobs would stay reserved by this worker for good).
    """

    _in_flight = 0
    _in_flight_lock = threading.Lock()

    def flush(self, requests):
        requests = list(requests)
        with self._in_flight_lock:
            free = self._in_flight < self._pool.num_processes
            if free:
                self._in_flight += 1
        if not free:
            for request in requests:  # kept for when a process is free (timer or callback)
                self._buffer.put(request)
            return None
        batch, rest = requests[: self.flush_every], requests[self.flush_every :]
        for request in rest:
            self._buffer.put(request)

        def finished():
            with self._in_flight_lock:
                self._in_flight -= 1
            self._do_flush()  # the next batch: whatever waits now

        def acknowledge(_result):
            for request in batch:
                request.acknowledge()
            finished()

        def give_back(_error):
            for request in batch:
                request.reject(requeue=True)
            finished()

        return self._pool.apply_async(
            apply_batches_task,
            (self, ([SimpleRequest.from_request(r) for r in batch],), 0, None),
            callback=acknowledge,
            error_callback=give_back,
        )


@app.task(
    base=ClassifyBatches,
    flush_every=settings.CLASSIFY_BATCH_SIZE,
    flush_interval=settings.CLASSIFY_BATCH_WAIT_MS / 1000,
)
def classify_image(requests):
    """The jobs this worker holds, as one batch; each job's args are [image id]."""
    retries = {}
    for request in requests:
        retries[str(request.args[0])] = int((request.kwargs or {}).get("retries", 0))
    try:
        outcome = services.images_classify(image_ids=list(retries), classifier=classifier())
    except DatabaseError as exc:
        # Nothing of the batch was written, and nothing can be failed now: send every job
        # again, later; past the retries PostgreSQL's sweeper sends them once it is back.
        logger.warning("database unavailable for %d jobs: %s", len(retries), exc)
        for image_id, tries in retries.items():
            if tries < settings.CLASSIFY_MAX_RETRIES:
                _send(image_id, retries=tries + 1, countdown=_backoff_s(tries))
            instruments.job_outcome("retried")
        return
    for image_id, retry_in_s in outcome.busy.items():
        # Another worker holds a fresh claim (or died holding it): look when it lapses.
        _send(image_id, retries=retries[image_id], countdown=retry_in_s)
        instruments.job_outcome("busy")
    for image_id, cause in outcome.transient.items():
        _again(image_id, retries[image_id], cause)
    for image_id in outcome.model_errors:
        # The image is queued again with one attempt used; a later try may succeed.
        _send(image_id, retries=retries[image_id], countdown=_backoff_s(retries[image_id]))
        instruments.job_outcome("model_error")
    for image_id, prediction in outcome.predictions.items():
        instruments.classified(image_id, prediction)
    for _ in outcome.failed:
        instruments.failed()
    for reason in outcome.rejected.values():
        instruments.rejected(reason)
    for _ in outcome.skipped:
        instruments.job_outcome("skipped")


def _again(image_id: str, tries: int, cause: str) -> None:
    """A transient failure: send the job again with backoff, or fail the image for good."""
    if tries >= settings.CLASSIFY_MAX_RETRIES:
        services.image_fail(image_id, f"gave up after {tries + 1} tries: {cause}")
        instruments.failed()
        return
    _send(image_id, retries=tries + 1, countdown=_backoff_s(tries))
    instruments.job_outcome("retried")


def _send(image_id: str, *, retries: int, countdown: float) -> None:
    try:
        jobs.send_classify(image_id, retries=retries, countdown=countdown)
    except Exception:  # noqa: BLE001  (Redis down: the image stays queued in PostgreSQL)
        logger.exception("could not send image %s again; the sweeper will", image_id)


@app.task
def resend_stuck_images():
    return services.images_resend_stuck()
