"""/healthz, /readyz and the worker's readiness probe."""

import os
import subprocess
import sys

import pytest
from django.test import Client

from workers import health

pytestmark = pytest.mark.usefixtures("s3_bucket")


def test_healthz_answers_without_touching_the_database():
    # No django_db mark: any query would fail the test.
    response = Client().get("/healthz")

    assert (response.status_code, response.json()) == (200, {"status": "ok"})


@pytest.mark.django_db
def test_readyz_reports_every_dependency_ok():
    response = Client().get("/readyz")

    assert (response.status_code, response.json()) == (
        200,
        {"status": "ok", "checks": {"database": "ok", "redis": "ok", "storage": "ok"}},
    )


@pytest.mark.django_db
def test_readyz_is_503_with_the_cause_when_s3_is_down(s3_down):
    response = Client().get("/readyz")

    body = response.json()
    assert (response.status_code, response["Retry-After"]) == (503, "5")
    assert body["status"] == "unavailable"
    assert (body["checks"]["database"], body["checks"]["redis"]) == ("ok", "ok")
    assert body["checks"]["storage"].startswith("EndpointConnectionError: ")


@pytest.mark.django_db
def test_readyz_is_503_when_redis_does_not_answer(settings, s3_down):
    settings.CELERY_BROKER_URL = settings.S3_ENDPOINT_URL.replace("http", "redis") + "/0"

    body = Client().get("/readyz").json()

    assert body["checks"]["redis"].startswith("ConnectionError: ")


@pytest.mark.django_db
def test_probes_answer_on_any_host_and_over_plain_http_in_production_settings(settings):
    # Kubernetes and compose probe the container's own address, without TLS.
    settings.ALLOWED_HOSTS = ["mri.example.org"]
    settings.SECURE_SSL_REDIRECT = True
    client = Client(HTTP_HOST="10.1.2.3:8000")

    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").status_code == 200
    assert client.get("/metrics").status_code == 200
    # Everything else still gets the host check.
    assert client.get("/api/v1/cases/").status_code == 400


@pytest.fixture
def ready_file(settings, tmp_path):
    settings.WORKER_READY_FILE = str(tmp_path / "worker-ready")
    return tmp_path / "worker-ready"


def test_a_worker_is_not_ready_before_its_model_is_loaded(ready_file):
    assert health.is_ready() == (False, f"no model loaded yet ({ready_file} missing)")


def test_a_worker_is_ready_while_the_process_that_loaded_the_model_lives(ready_file):
    ready_file.write_text(f"{os.getpid()}\n")
    assert health.is_ready() == (True, f"model loaded by process {os.getpid()}")

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    ready_file.write_text(f"{gone.pid}\n")
    assert health.is_ready() == (False, f"the process that loaded the model ({gone.pid}) is gone")


def test_the_probe_command_exits_non_zero_until_ready(ready_file):
    env = os.environ | {"WORKER_READY_FILE": str(ready_file)}
    probe = [sys.executable, "-m", "workers.health"]

    not_ready = subprocess.run(probe, env=env, capture_output=True, text=True)
    ready_file.write_text(f"{os.getpid()}\n")
    ready = subprocess.run(probe, env=env, capture_output=True, text=True)

    assert (not_ready.returncode, not_ready.stdout) == (
        1,
        f"no model loaded yet ({ready_file} missing)\n",
    )
    assert (ready.returncode, ready.stdout) == (0, f"model loaded by process {os.getpid()}\n")
