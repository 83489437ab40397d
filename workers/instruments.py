"""What the workers measure for Prometheus (served by workers.metrics).

Imported only once the worker runs (by workers.tasks, after Django is set up), so
prometheus_client sees PROMETHEUS_MULTIPROC_DIR, which workers.metrics sets first: every
pool process writes its samples there and the main process serves their sum.
"""

from django.conf import settings
from prometheus_client import Counter, Gauge, Histogram

from diagnostics.models import Image, Status

INFERENCE_SECONDS = Histogram(
    "diagnostics_inference_seconds",
    "Time to decode and classify one image",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
CLASSIFY_JOBS = Counter(
    "diagnostics_classify_jobs",
    "Classification jobs by outcome: done, failed, retried (S3/database down), "
    "model_error (retried on another try), busy (another worker holds it), skipped",
    ["outcome"],
)
IMAGES_FLAGGED = Counter(
    "diagnostics_images_flagged",
    "Predictions less confident than REVIEW_CONFIDENCE_THRESHOLD (the case needs review)",
    ["label"],
)
IMAGES_REJECTED = Counter(
    "diagnostics_images_rejected",
    "Images that failed instead of getting a prediction",
)
MODEL_INFO = Gauge(
    "diagnostics_model_info",
    "The model this worker serves (value 1)",
    ["name", "version", "sha256", "runtime"],
    multiprocess_mode="max",
)
WEBHOOK_DELIVERIES = Counter(
    "diagnostics_webhook_deliveries",
    "Webhook delivery attempts by outcome: delivered, retry, failed, skipped",
    ["outcome"],
)


def model_loaded(classifier) -> None:
    MODEL_INFO.labels(
        name=classifier.name,
        version=classifier.version,
        sha256=classifier.sha256,
        runtime=classifier.runtime,
    ).set(1)


def classified(image_id, prediction) -> None:
    """Record a finished classify job: its prediction, or why there is none."""
    if prediction is not None:
        CLASSIFY_JOBS.labels("done").inc()
        INFERENCE_SECONDS.observe(prediction.inference_ms / 1000)
        if max(prediction.probabilities.values()) < settings.REVIEW_CONFIDENCE_THRESHOLD:
            IMAGES_FLAGGED.labels(prediction.label).inc()
        return
    # No prediction: the model could not read it (failed now), or nothing was left to do.
    if Image.objects.filter(id=image_id, status=Status.FAILED).exists():
        failed()
    else:
        CLASSIFY_JOBS.labels("skipped").inc()


def failed() -> None:
    CLASSIFY_JOBS.labels("failed").inc()
    IMAGES_REJECTED.inc()


def job_outcome(outcome: str) -> None:
    CLASSIFY_JOBS.labels(outcome).inc()
