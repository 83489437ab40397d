"""What the workers measure for Prometheus (served by workers.metrics).

Imported only once the worker runs (by workers.tasks, after Django is set up), so
prometheus_client sees PROMETHEUS_MULTIPROC_DIR, which workers.metrics sets first: every
pool process writes its samples there and the main process serves their sum.
"""

from prometheus_client import Counter, Gauge, Histogram

from diagnostics.models import Image, Status

INFERENCE_SECONDS = Histogram(
    "diagnostics_inference_seconds",
    "Time to decode and classify one image",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
CLASSIFY_JOBS = Counter(
    "diagnostics_classify_jobs",
    "Classification jobs by outcome: done, rejected (not a brain MRI slice), failed, "
    "retried (S3/database down), model_error (retried on another try), busy (another "
    "worker holds it), skipped",
    ["outcome"],
)
IMAGES_FLAGGED = Counter(
    "diagnostics_images_flagged",
    "Predictions flagged needs_review (calibrated confidence below the model's review "
    "threshold): the case needs review",
    ["label"],
)
IMAGES_REJECTED = Counter(
    "diagnostics_images_rejected",
    "Images the model rejected as not a brain MRI slice, by reason: blank, colour, noise, "
    "out_of_distribution (the OOD score), other",
    ["reason"],
)
# What ml.ood's rejection sentences say -> the reason label (a few fixed values).
REJECTION_KINDS = {
    "blank": "blank",
    "colour": "colour",
    "noise": "noise",
    "training distribution": "out_of_distribution",
}
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
    """Record a finished classify job: its prediction (the Prediction row), or why there
    is none (`prediction` None: the image failed, was rejected, or was done elsewhere)."""
    if prediction is not None:
        CLASSIFY_JOBS.labels("done").inc()
        INFERENCE_SECONDS.observe(prediction.inference_ms / 1000)
        if prediction.needs_review:
            IMAGES_FLAGGED.labels(prediction.label).inc()
        return
    image = Image.objects.filter(id=image_id).only("status", "error").first()
    if image is not None and image.status == Status.FAILED:
        failed()
    elif image is not None and image.status == Status.REJECTED:
        rejected(image.error)
    else:
        CLASSIFY_JOBS.labels("skipped").inc()


def failed() -> None:
    CLASSIFY_JOBS.labels("failed").inc()


def rejected(reason: str = "") -> None:
    """An image the model refused (not a brain MRI slice); `reason` as the model gave it."""
    CLASSIFY_JOBS.labels("rejected").inc()
    IMAGES_REJECTED.labels(rejection_kind(reason)).inc()


def rejection_kind(reason: str) -> str:
    return next((kind for words, kind in REJECTION_KINDS.items() if words in reason), "other")


def job_outcome(outcome: str) -> None:
    CLASSIFY_JOBS.labels(outcome).inc()
