"""`python -m devstack up`: the whole stack in the foreground, stopped in order on Ctrl-C."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from devstack import services

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = PROJECT_ROOT / ".devstack"
DEFAULT_PORT = 8000
API_PATH = "/api/v1/cases/"
WEB_READY_TIMEOUT_S = 60.0
# Celery finishes the task in hand on SIGTERM (warm shutdown); give inference time to end.
WORKER_STOP_TIMEOUT_S = 60.0
WEB_STOP_TIMEOUT_S = 30.0


class StackError(RuntimeError):
    pass


def up(data_dir: Path, port: int) -> int:
    data_dir = data_dir.expanduser().resolve()
    if not services.port_is_free(port):
        print(f"Port {port} on 127.0.0.1 is in use; pass --port.", file=sys.stderr)
        return 2
    data_dir.mkdir(parents=True, exist_ok=True)
    # SIGTERM (docker, systemd, kill) and SIGHUP (terminal closed) stop the stack like Ctrl-C.
    # SIGINT too, explicitly: a shell that starts us in the background leaves it ignored.
    for stop_signal in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(stop_signal, _raise_keyboard_interrupt)
    try:
        with contextlib.ExitStack() as running:
            env = start_missing_services(data_dir, running)
            token = _prepare_database_and_storage(env)
            web = running.enter_context(
                _supervised("web", _web_command(port), env, signal.SIGTERM, WEB_STOP_TIMEOUT_S)
            )
            worker = running.enter_context(
                _supervised(
                    "worker", _worker_command(data_dir), env, signal.SIGTERM, WORKER_STOP_TIMEOUT_S
                )
            )
            _wait_for_api(f"http://127.0.0.1:{port}{API_PATH}", token, web)
            _print_banner(port, token, data_dir)
            return _watch({"web": web, "worker": worker})
    except KeyboardInterrupt:
        print("\nStopped.", file=sys.stderr)
        return 0
    except (StackError, services.ServiceError, subprocess.CalledProcessError) as error:
        print(f"\ndevstack: {error}", file=sys.stderr)
        return 1


def _raise_keyboard_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def start_missing_services(data_dir: Path, running: contextlib.ExitStack) -> dict[str, str]:
    """Environment for the children: given URLs are kept, missing ones point at embedded servers."""
    env = dict(os.environ)
    # Runs after the services it precedes have stopped.
    running.callback(print, "embedded services stopped", file=sys.stderr)
    if "DATABASE_URL" not in env:
        env["DATABASE_URL"] = _start_embedded(
            running, services.start_postgres, data_dir / "postgres"
        )
    if "REDIS_URL" not in env:
        env["REDIS_URL"] = _start_embedded(running, services.start_redis, data_dir / "redis")
    if "S3_ENDPOINT_URL" not in env:
        # The embedded S3 accepts exactly these keys, so the children must use them too.
        env.setdefault("S3_ACCESS_KEY_ID", "devkey")
        env.setdefault("S3_SECRET_ACCESS_KEY", "devsecret")
        env["S3_ENDPOINT_URL"] = _start_embedded(
            running,
            services.start_s3,
            data_dir / "s3",
            access_key=env["S3_ACCESS_KEY_ID"],
            secret_key=env["S3_SECRET_ACCESS_KEY"],
        )
    for name in ("DATABASE_URL", "REDIS_URL", "S3_ENDPOINT_URL"):
        print(f"{name}={env[name]}")
    return env


def _start_embedded(running: contextlib.ExitStack, start, data_dir: Path, **options) -> str:
    started_at = time.monotonic()
    service = running.enter_context(start(data_dir, **options))
    elapsed = time.monotonic() - started_at
    print(f"started {service.name} in {elapsed:.1f}s (data and log in {data_dir})")
    return service.url


def _prepare_database_and_storage(env: dict[str, str]) -> str:
    """Migrate, create the bucket and the demo user; return the demo user's API token."""
    _manage(env, "migrate", "--noinput")
    _manage(env, "bootstrap_storage")
    output = _manage(env, "create_demo_user", capture=True)
    for line in output.splitlines():
        if line.startswith("TOKEN="):
            token = line.removeprefix("TOKEN=").strip()
            print(f"\n  Demo API token: {token}\n", flush=True)
            return token
    raise StackError(f"create_demo_user printed no TOKEN= line:\n{output}")


def _manage(env: dict[str, str], *args: str, capture: bool = False) -> str:
    print(f"$ python manage.py {' '.join(args)}", flush=True)
    completed = subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=PROJECT_ROOT,
        env=env,
        check=True,
        stdout=subprocess.PIPE if capture else None,
        text=True,
    )
    return completed.stdout or ""


def _web_command(port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "gunicorn",
        "diagnostics.wsgi:application",
        f"--bind=127.0.0.1:{port}",
        "--workers=2",
        # Threads overlap a request's S3 and database waits (bench/results/end_to_end.md).
        "--threads=4",
        "--access-logfile=-",
    ]


def _worker_command(data_dir: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "workers",
        "worker",
        "--loglevel=info",
        # The one worker also runs the sweeper's schedule (`celery beat`, one per deployment);
        # its state file goes with the other local data, not into the source tree.
        "--beat",
        f"--schedule={data_dir / 'celerybeat-schedule'}",
    ]


@contextlib.contextmanager
def _supervised(
    name: str,
    command: list[str],
    env: dict[str, str],
    stop_signal: signal.Signals,
    stop_timeout_s: float,
) -> Iterator[subprocess.Popen]:
    """Run ``command`` with its output on our terminal; stop it when the context ends."""
    print(f"starting {name}: {' '.join(command)}", flush=True)
    process = subprocess.Popen(
        command, cwd=PROJECT_ROOT, env=env, **services.supervised_popen_kwargs(stop_signal)
    )
    try:
        yield process
    finally:
        print(f"stopping {name}...", file=sys.stderr, flush=True)
        services.stop_process(process, stop_signal, stop_timeout_s)


def _wait_for_api(url: str, token: str, web: subprocess.Popen) -> None:
    """Wait until an authenticated request to the API succeeds: proves the web server and token."""
    request = urllib.request.Request(url, headers={"Authorization": f"Token {token}"})
    deadline = time.monotonic() + WEB_READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if web.poll() is not None:
            raise StackError(f"the web server exited with status {web.returncode}")
        try:
            with urllib.request.urlopen(request, timeout=2):
                return
        except urllib.error.HTTPError as error:
            raise StackError(f"GET {url} answered {error.code}: {error.read()[:500]!r}") from error
        except OSError:
            time.sleep(0.2)
    raise StackError(f"the API did not answer at {url} within {WEB_READY_TIMEOUT_S:.0f}s")


def _print_banner(port: int, token: str, data_dir: Path) -> None:
    api_url = f"http://127.0.0.1:{port}{API_PATH}"
    rule = "=" * 78
    print(
        f"""
{rule}
  The stack is up.
  API:    {api_url}
  Token:  {token}
  Data:   {data_dir}

  Submit a scan:
    curl -H "Authorization: Token {token}" \\
         -F reference=demo-1 -F images=@scan.jpg {api_url}
  List cases:
    curl -H "Authorization: Token {token}" {api_url}

  Ctrl-C stops everything.
{rule}
""",
        flush=True,
    )


def _watch(children: dict[str, subprocess.Popen]) -> int:
    """Block until a child exits on its own (then everything stops) or a stop signal arrives."""
    while True:
        for name, process in children.items():
            if process.poll() is not None:
                print(
                    f"\n{name} exited with status {process.returncode}; stopping.", file=sys.stderr
                )
                return 1
        time.sleep(0.5)
