import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection

REPO_ROOT = Path(__file__).resolve().parents[2]


def _database_url() -> str:
    """The URL of the test database pytest-django created, for other processes."""
    db = connection.settings_dict
    password = f":{db['PASSWORD']}" if db["PASSWORD"] else ""
    port = f":{db['PORT']}" if db["PORT"] else ""
    return f"postgres://{db['USER']}{password}@{db['HOST']}{port}/{db['NAME']}"


@pytest.fixture
def start_worker(tiny_model_dir, s3_bucket, tmp_path):
    """Start real `celery -A workers worker` processes on the test database, bucket and
    broker; each is stopped (and its log printed on failure) at the end of the test."""
    started = []

    def start(*extra_args: str, model_dir: Path = tiny_model_dir) -> subprocess.Popen:
        log_path = tmp_path / f"worker-{len(started)}.log"
        env = os.environ | {
            "DATABASE_URL": _database_url(),
            "CELERY_BROKER_URL": settings.CELERY_BROKER_URL,
            "S3_ENDPOINT_URL": settings.S3_ENDPOINT_URL,
            "S3_BUCKET": s3_bucket,
            "MODEL_DIR": str(model_dir),
        }
        command = [sys.executable, "-m", "celery", "-A", "workers", "worker", "--loglevel=info"]
        command += ["--without-gossip", "--without-mingle", "--hostname", f"e2e{len(started)}@%h"]
        worker = subprocess.Popen(
            [*command, *extra_args],
            cwd=REPO_ROOT,
            env=env,
            stdout=log_path.open("wb"),
            stderr=subprocess.STDOUT,
        )
        started.append((worker, log_path))
        return worker

    yield start

    for worker, log_path in started:
        if worker.poll() is None:
            worker.terminate()
            try:
                worker.wait(timeout=20)
            except subprocess.TimeoutExpired:
                worker.kill()
        print(f"--- {log_path.name} ---\n{log_path.read_text(errors='replace')[-4000:]}")


def wait_for(predicate, *, timeout: float, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"gave up waiting after {timeout} s")
