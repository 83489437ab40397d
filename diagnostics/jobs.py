"""The queue boundary: how the web process hands work to the workers (Celery on Redis).

Jobs are sent by task name so the web process never imports the worker's model code.
The app's task_routes put them on their queue (classify_image: `classify`, see workers.app).
"""

from workers.app import app

CLASSIFY_TASK = "workers.tasks.classify_image"


def send_classify(image_id) -> None:
    app.send_task(CLASSIFY_TASK, args=[str(image_id)])
