"""Broker settings that fit long jobs on a shared queue."""

import os
import subprocess
import sys
from pathlib import Path

from django.conf import settings

from workers.app import app

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_jobs_are_acknowledged_late_in_batches_with_time_limits():
    conf = app.conf
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    # One batch running and the next filling (workers.tasks.classify_image).
    assert conf.worker_prefetch_multiplier == 2 * settings.CLASSIFY_BATCH_SIZE
    assert conf.task_time_limit == settings.CLASSIFY_TIME_LIMIT_S
    assert 0 < conf.task_soft_time_limit < conf.task_time_limit
    # Redis must not hand a job that is still running to a second worker.
    assert conf.broker_transport_options["visibility_timeout"] > conf.task_time_limit + 5


def test_a_visibility_timeout_shorter_than_a_job_is_refused_at_start():
    env = os.environ | {"CLASSIFY_TIME_LIMIT_S": "600", "CELERY_VISIBILITY_TIMEOUT_S": "300"}
    result = subprocess.run(
        [sys.executable, "-c", "import workers"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "CELERY_VISIBILITY_TIMEOUT_S must exceed CLASSIFY_TIME_LIMIT_S + 5" in result.stderr


def test_the_sweeper_is_scheduled():
    entry = app.conf.beat_schedule["resend-stuck-images"]
    assert entry["task"] == "workers.tasks.resend_stuck_images"
    assert entry["schedule"] == settings.SWEEP_INTERVAL_S


def test_a_worker_does_not_import_what_only_uploads_and_webhook_deliveries_need():
    # Each is a tenth of a second or more of every worker's cold start (bench/worker.py).
    code = (
        "import sys, workers.app, workers.tasks, workers.webhooks, workers.logs, workers.health; "
        # What a starting worker does next: import its modules, which is when Celery's
        # Django fixup would run the system checks and with them import the URLconf.
        "from workers.app import app; app.loader.import_default_modules(); "
        "print(sorted(m for m in ('pydicom', 'requests', 'diagnostics.urls') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
