"""Fault drills on the real services and real processes: nothing accepted is ever lost."""

import socket
import subprocess
import sys
import threading

import pytest
import requests

from devstack.services import start_postgres, start_redis
from diagnostics.models import Case, Image, Prediction, Status
from tests.e2e.conftest import REPO_ROOT, free_port, wait_for
from tests.factories import UserFactory, token_for
from tests.images import image_bytes

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

# Short limits so a dead worker's job comes back within seconds: Redis redelivers an
# unacknowledged job after the visibility timeout, and the claim's lease (time limit + 5 s)
# has lapsed by then.
QUICK_REDELIVERY = {"CLASSIFY_TIME_LIMIT_S": 10, "CELERY_VISIBILITY_TIMEOUT_S": 18}


def upload(api_url: str, token: str, *seeds: int) -> str:
    response = requests.post(
        f"{api_url}/api/v1/cases/",
        files=[("images", (f"{seed}.jpg", image_bytes(seed=seed), "image/jpeg")) for seed in seeds],
        headers={"Authorization": f"Token {token}"},
        timeout=30,
    )
    assert response.status_code == 202, response.text
    return response.headers["Location"]


class SilentServer:
    """Accepts TCP connections and never answers: an S3 that hangs mid-request."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.connections = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                self.connections.append(self.listener.accept()[0])
            except OSError:
                return

    def close(self):
        self.listener.close()
        for connection in self.connections:
            connection.close()


def test_a_worker_killed_mid_job_has_its_job_delivered_again(live_server, processes, broker):
    """SIGKILL while the job is in flight (claimed, result not written): the job comes back
    from Redis to another worker and completes; one prediction is written."""
    token = token_for(UserFactory())
    hanging_s3 = SilentServer()
    doomed = processes.start("worker", S3_ENDPOINT_URL=hanging_s3.url, **QUICK_REDELIVERY)
    poll_url = upload(live_server.url, token, 1)
    image = Image.objects.get()
    wait_for(lambda: Image.objects.get(id=image.id).status == Status.PROCESSING, timeout=60)

    processes.kill(doomed)
    hanging_s3.close()
    processes.start("worker", **QUICK_REDELIVERY)

    headers = {"Authorization": f"Token {token}"}
    case = wait_for(
        lambda: (
            (body := requests.get(poll_url, headers=headers, timeout=10).json())["status"] == "done"
            and body
        ),
        timeout=90,
    )
    assert case["images"][0]["prediction"]["model"]["name"] == "tiny-test"
    assert Prediction.objects.filter(image=image).count() == 1
    assert Image.objects.get(id=image.id).attempts == 2


def test_redis_restarted_empty_loses_no_case(processes, tmp_path):
    """Jobs queued in a Redis that is then replaced by an empty one: the sweeper re-sends
    them from PostgreSQL and every case reaches done."""
    token = token_for(UserFactory())
    port = free_port()
    redis_url = f"redis://127.0.0.1:{port}/0"
    with start_redis(tmp_path / "redis-before", port=port):
        api_url = processes.web(CELERY_BROKER_URL=redis_url)
        poll_urls = [upload(api_url, token, seed) for seed in (1, 2, 3)]
        assert set(Image.objects.values_list("status", flat=True)) == {Status.QUEUED}
    # Same address, no data: every queued job is gone.
    with start_redis(tmp_path / "redis-after", port=port):
        # Beat schedules the sweep; a worker runs it, with the worker's settings.
        processes.start("worker", CELERY_BROKER_URL=redis_url, SWEEP_QUEUED_AFTER_S=2)
        processes.start("beat", CELERY_BROKER_URL=redis_url, SWEEP_INTERVAL_S=1)
        headers = {"Authorization": f"Token {token}"}
        for poll_url in poll_urls:
            wait_for(
                lambda url=poll_url: (
                    requests.get(url, headers=headers, timeout=10).json()["status"] == "done"
                ),
                timeout=90,
            )
    assert Prediction.objects.count() == Image.objects.count() == 3


def test_postgres_restart_gives_503_then_recovers_by_itself(processes, tmp_path, broker):
    port = free_port()
    pg_dir = tmp_path / "postgres"
    postgres = start_postgres(pg_dir, port=port)
    env = {"DATABASE_URL": postgres.url}
    manage = [sys.executable, "manage.py"]
    run_env = processes.env | env
    subprocess.run([*manage, "migrate", "-v0"], cwd=REPO_ROOT, env=run_env, check=True)
    demo = subprocess.run(
        [*manage, "create_demo_user"], cwd=REPO_ROOT, env=run_env, check=True, capture_output=True
    )
    token = demo.stdout.decode().strip().removeprefix("TOKEN=")
    headers = {"Authorization": f"Token {token}"}
    api_url = processes.web(**env)
    processes.start("worker", **env)

    def done(poll_url):
        return lambda: (
            requests.get(poll_url, headers=headers, timeout=10).json()["status"] == "done"
        )

    first = upload(api_url, token, 1)
    wait_for(done(first), timeout=90)

    postgres.stop()
    during = requests.get(first, headers=headers, timeout=10)
    refused = requests.post(
        f"{api_url}/api/v1/cases/",
        files=[("images", ("2.jpg", image_bytes(seed=2), "image/jpeg"))],
        headers=headers,
        timeout=30,
    )

    with start_postgres(pg_dir, port=port):
        recovered = wait_for(
            lambda: requests.get(first, headers=headers, timeout=10).status_code == 200,
            timeout=30,
        )
        second = upload(api_url, token, 3)
        wait_for(done(second), timeout=90)

    assert during.status_code == 503
    assert during.json() == {
        "detail": "the database is unavailable, retry later",
        "code": "unavailable",
    }
    assert refused.status_code == 503
    assert recovered
    # Nothing was kept of the refused upload; the test database saw none of this.
    assert Case.objects.count() == 0
