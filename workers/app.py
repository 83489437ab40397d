import os

from celery import Celery
from kombu import Exchange, Queue

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "diagnostics.settings")
# Celery's Django fixup runs Django's system checks when a worker starts; the URL check
# imports the whole API (drf-spectacular, the FHIR models, pydicom), which a worker never
# serves: 0.6 s of its 2-2.5 s cold start on a 2-core node (bench/worker.py). The checks
# belong to deploys (`manage.py check --deploy`, `migrate`), which still run them.
os.environ.setdefault("CELERY_SKIP_CHECKS", "true")

from django.conf import settings  # noqa: E402  (needs DJANGO_SETTINGS_MODULE first)

from workers import metrics  # noqa: E402

# Before the task modules load prometheus_client: pool processes' metrics meet in one place.
metrics.share_between_pool_processes()

# Two queues, so classification can be scaled on GPU nodes while housekeeping runs elsewhere:
# classify_image goes to CLASSIFY_QUEUE; everything else (the sweepers, webhook deliveries)
# to Celery's default queue. A `celery -A workers worker` without -Q consumes both (one-node
# installs, ./stack up, the tests); a GPU node runs `-Q classify`, a housekeeping node
# `-Q celery`. The names are fixed, not settings: they are also written in worker commands.
CLASSIFY_QUEUE = "classify"
HOUSEKEEPING_QUEUE = "celery"
QUEUES = (CLASSIFY_QUEUE, HOUSEKEEPING_QUEUE)

# Celery imports these before it sends any worker signal, so the handlers in workers.logs
# (JSON logs, case ids) and workers.health (readiness) are connected in time.
app = Celery(
    "workers",
    include=["workers.tasks", "workers.webhooks", "workers.logs", "workers.health"],
)
app.conf.update(
    broker_url=settings.CELERY_BROKER_URL,
    # No result backend: results are written to PostgreSQL by the task itself.
    task_ignore_result=True,
    task_serializer="json",
    accept_content=["json"],
    task_default_queue=HOUSEKEEPING_QUEUE,
    # Each queue with its own direct exchange and routing key, as Celery declares its default
    # queue (a bare Queue(name) would be bound to the `celery` exchange with key `celery`).
    task_queues=[Queue(name, Exchange(name), routing_key=name) for name in QUEUES],
    # send_task (diagnostics.jobs) applies these routes too: the web process needs no task code.
    task_routes={"workers.tasks.classify_image": {"queue": CLASSIFY_QUEUE}},
    # A job is acknowledged only when it finished, and re-queued if its worker dies, so a
    # crash never loses an image; services make the second delivery harmless.
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    # Classification runs in batches (workers.tasks): each pool process may hold one batch
    # running and the next one filling; more would keep waiting jobs from idle workers.
    worker_prefetch_multiplier=2 * settings.CLASSIFY_BATCH_SIZE,
    worker_concurrency=settings.CELERY_WORKER_CONCURRENCY,
    worker_pool=settings.CELERY_WORKER_POOL,
    # Above the longest job, or Redis would hand a running job to a second worker.
    broker_transport_options={
        "visibility_timeout": settings.CELERY_VISIBILITY_TIMEOUT_S,
        # Look for jobs of dead workers (unacknowledged past the visibility timeout) every
        # 10 s; kombu's default scans only every tenth interval, i.e. every 100 s.
        "unacked_restore_interval": 10,
        "unacked_restore_throttle": 1,
    },
    broker_connection_retry_on_startup=True,
    # Celery's Django fixup closes the database connection after every task (celery#9824:
    # a time limit can interrupt a query and leave a connection that looks usable), so each
    # batch, however small, paid for a new PostgreSQL connection: a backend process and
    # about 5 ms before its claim. With this it closes one every 1000 tasks instead, and
    # workers.tasks closes it after any task that raised and checks it before each task
    # (CONN_MAX_AGE, CONN_HEALTH_CHECKS), as Django does around a request.
    CELERY_DB_REUSE_MAX=1000,
    task_time_limit=settings.CLASSIFY_TIME_LIMIT_S,
    # The soft limit raises inside the task first, so a slow input is retried, then failed.
    task_soft_time_limit=max(int(settings.CLASSIFY_TIME_LIMIT_S * 0.9), 1),
    worker_hijack_root_logger=False,
    # The sweeper: `celery -A workers beat` (one per deployment) runs it on this schedule.
    beat_schedule={
        "resend-stuck-images": {
            "task": "workers.tasks.resend_stuck_images",
            "schedule": settings.SWEEP_INTERVAL_S,
        },
        # Webhook deliveries whose job was lost (Redis down when the event happened).
        "resend-stuck-webhooks": {
            "task": "workers.webhooks.resend_stuck_webhooks",
            "schedule": 60,
        },
    },
)
