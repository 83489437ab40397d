"""Real processes for end-to-end tests: `celery -A workers worker`, `celery -A workers beat`
and gunicorn, on the test database, the test bucket and a real Redis."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from django.conf import settings
from django.db import connection

REPO_ROOT = Path(__file__).resolve().parents[2]


def database_url(name: str | None = None) -> str:
    """The URL of the test database pytest-django created, for other processes."""
    db = connection.settings_dict
    password = f":{db['PASSWORD']}" if db["PASSWORD"] else ""
    port = f":{db['PORT']}" if db["PORT"] else ""
    return f"postgres://{db['USER']}{password}@{db['HOST']}{port}/{name or db['NAME']}"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(predicate, *, timeout: float, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(f"gave up waiting after {timeout} s")


def assert_worker_ready(ready_file: Path, *, timeout: float) -> None:
    """The worker wrote its readiness file, and the probe compose and Kubernetes run
    (`python -m workers.health`) says ready."""
    wait_for(ready_file.exists, timeout=timeout)
    probe = [sys.executable, "-m", "workers.health"]
    probe_env = {"WORKER_READY_FILE": str(ready_file), "PATH": ""}
    assert subprocess.run(probe, cwd=REPO_ROOT, env=probe_env).returncode == 0


COMMANDS = {
    "worker": lambda name, tmp: [
        *("-m", "celery", "-A", "workers", "worker", "--loglevel=info"),
        *("--without-gossip", "--without-mingle", f"--hostname={name}@%h"),
    ],
    "beat": lambda name, tmp: [
        *("-m", "celery", "-A", "workers", "beat", "--loglevel=info"),
        f"--schedule={tmp / f'{name}-schedule'}",
    ],
}


@pytest.fixture
def processes(tiny_model_dir, s3_bucket, tmp_path):
    """Start real project processes; each is stopped, and its log printed, after the test.

    `processes.start(kind, **env)` with kind "worker" or "beat", or `processes.web(**env)`
    for gunicorn (returns its base URL). Processes run in their own session, so
    `processes.kill(p)` can SIGKILL a worker with its pool children.
    """

    class Processes:
        env = os.environ | {
            "DATABASE_URL": database_url(),
            "CELERY_BROKER_URL": settings.CELERY_BROKER_URL,
            "S3_ENDPOINT_URL": settings.S3_ENDPOINT_URL,
            "S3_BUCKET": s3_bucket,
            "MODEL_DIR": str(tiny_model_dir),
        }
        started: list[tuple[subprocess.Popen, Path]] = []

        def _popen(self, name, args, env):
            log_path = tmp_path / f"{name}.log"
            process = subprocess.Popen(
                [sys.executable, *args],
                cwd=REPO_ROOT,
                env=self.env | {key: str(value) for key, value in env.items()},
                stdout=log_path.open("wb"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            self.started.append((process, log_path))
            return process

        def start(self, kind: str, *args: str, **env) -> subprocess.Popen:
            """`args` go after the command's own (a worker's `-Q classify`, say)."""
            name = f"{kind}{len(self.started)}"
            return self._popen(name, [*COMMANDS[kind](name, tmp_path), *args], env)

        def web(self, **env) -> str:
            port = free_port()
            args = ["-m", "gunicorn", "diagnostics.wsgi:application", f"--bind=127.0.0.1:{port}"]
            web = self._popen(f"web{len(self.started)}", [*args, "--workers=2"], env)
            url = f"http://127.0.0.1:{port}"

            def answers():
                assert web.poll() is None, "gunicorn exited"
                try:
                    return requests.get(f"{url}/api/v1/cases/", timeout=2).status_code == 401
                except (requests.ConnectionError, requests.Timeout):
                    # Not listening yet, or still loading the app on a busy machine.
                    return False

            wait_for(answers, timeout=30)
            return url

        @staticmethod
        def stop(process: subprocess.Popen) -> None:
            """SIGTERM, as compose and Kubernetes stop a container; wait for the exit."""
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=60)

        @staticmethod
        def kill(process: subprocess.Popen) -> None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    yield Processes()

    for process, log_path in Processes.started:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        print(f"--- {log_path.name} ---\n{log_path.read_text(errors='replace')[-3000:]}")


@pytest.fixture
def start_worker(processes):
    return lambda *args, **env: processes.start("worker", *args, **env)
