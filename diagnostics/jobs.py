"""The queue boundary: how the web process hands work to the workers (Celery on Redis).

Jobs are sent by task name so the web process never imports the worker's model code.
The app's task_routes put them on their queue (classify_image: `classify`, see workers.app).
"""

from workers.app import app

CLASSIFY_TASK = "workers.tasks.classify_image"


def send_classify(image_id, *, retries: int = 0, countdown: float | None = None) -> None:
    """One classification job. `retries`: how many times the image's transient failures
    (S3 or the database unreachable) were retried already; the task gives up at
    CLASSIFY_MAX_RETRIES. `countdown`: seconds before a worker may start it."""
    kwargs = {"retries": retries} if retries else {}
    app.send_task(CLASSIFY_TASK, args=[str(image_id)], kwargs=kwargs, countdown=countdown)
