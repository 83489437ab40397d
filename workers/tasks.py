"""Thin tasks: they take ids, call services, and decide only about retries."""

import functools
import logging
import threading

import django

django.setup()

from celery.signals import worker_process_init, worker_ready  # noqa: E402
from django.conf import settings  # noqa: E402
from django.db import DatabaseError  # noqa: E402

from diagnostics import services  # noqa: E402
from diagnostics.storage import StorageUnavailable  # noqa: E402
from workers import instruments  # noqa: E402
from workers.app import app  # noqa: E402

logger = logging.getLogger(__name__)

# Errors that go away by themselves: the object store or the database being unreachable.
TRANSIENT_ERRORS = (StorageUnavailable, DatabaseError)


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


@worker_process_init.connect
def _load_model_before_taking_jobs(**_):
    classifier()


@worker_ready.connect
def _load_model_in_a_threads_pool(**_):
    # Prefork pool processes load it in worker_process_init; a threads pool runs jobs in
    # this process, which sends no such signal: load it here and report ready the same way.
    if settings.CELERY_WORKER_POOL == "threads":
        from workers.health import _ready_once_the_model_is_loaded

        _ready_once_the_model_is_loaded()


def _backoff_s(retries: int) -> int:
    # 2, 4, 8, ... seconds, capped at a minute.
    return min(2 ** (retries + 1), 60)


@app.task(bind=True, max_retries=settings.CLASSIFY_MAX_RETRIES)
def classify_image(self, image_id: str):
    try:
        prediction = services.image_classify(image_id=image_id, classifier=classifier())
    except services.ImageBusy as busy:
        # Another worker holds a fresh claim (or died holding it): look again when it lapses.
        instruments.job_outcome("busy")
        raise self.retry(countdown=busy.retry_in_s, max_retries=None) from busy
    except TRANSIENT_ERRORS as exc:
        if self.request.retries >= self.max_retries:
            services.image_fail(image_id, f"gave up after {self.request.retries + 1} tries: {exc}")
            instruments.failed()
            return
        services.image_release(image_id)
        instruments.job_outcome("retried")
        raise self.retry(exc=exc, countdown=_backoff_s(self.request.retries)) from exc
    except Exception as exc:
        # The model raised on this input: try again a bounded number of times, then fail
        # the image with the cause; the worker keeps serving other images.
        logger.exception("classifying image %s failed", image_id)
        cause = f"classification error: {type(exc).__name__}: {exc}"
        if services.image_attempt_failed(image_id, cause):
            instruments.job_outcome("model_error")
            raise self.retry(countdown=_backoff_s(self.request.retries), max_retries=None) from exc
        instruments.failed()
    else:
        instruments.classified(image_id, prediction)


@app.task
def resend_stuck_images():
    return services.images_resend_stuck()
