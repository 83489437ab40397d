"""The embedded servers start for real, answer their clients, keep data, and leave no process."""

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import boto3
import botocore.exceptions
import psutil
import psycopg2
import pytest
import redis

import devstack
from devstack.services import start_postgres, start_redis, start_s3

PROJECT_ROOT = Path(devstack.__file__).resolve().parent.parent


def assert_gone(pid: int, timeout_s: float = 10.0) -> None:
    """The process has exited (a zombie waiting for init to reap it counts as exited)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return
        except psutil.NoSuchProcess:
            return
        time.sleep(0.1)
    pytest.fail(f"process {pid} is still running")


def test_postgres_serves_the_database_and_keeps_data_across_restarts(tmp_path):
    with start_postgres(tmp_path / "pg") as postgres:
        assert postgres.url.startswith("postgres://postgres@127.0.0.1:")
        assert postgres.url.endswith("/diagnostics")
        with psycopg2.connect(postgres.url) as connection, connection.cursor() as cursor:
            cursor.execute("SELECT current_database()")
            assert cursor.fetchone() == ("diagnostics",)
            cursor.execute("CREATE TABLE kept (value text); INSERT INTO kept VALUES ('scan')")
        connection.close()
    assert_gone(postgres.pid)

    with start_postgres(tmp_path / "pg") as restarted:
        with psycopg2.connect(restarted.url) as connection, connection.cursor() as cursor:
            cursor.execute("SELECT value FROM kept")
            assert cursor.fetchall() == [("scan",)]
        connection.close()
    assert_gone(restarted.pid)


def test_redis_answers_and_keeps_data_across_restarts(tmp_path):
    with start_redis(tmp_path / "redis") as server:
        client = redis.Redis.from_url(server.url)
        assert client.ping()
        client.set("job", "queued")
        assert client.get("job") == b"queued"
        client.close()
    assert_gone(server.pid)

    with start_redis(tmp_path / "redis") as restarted:
        client = redis.Redis.from_url(restarted.url)
        assert client.get("job") == b"queued"
        client.close()
    assert_gone(restarted.pid)


def test_s3_stores_objects_for_the_configured_keys_only(tmp_path):
    def client(endpoint_url, secret_key):
        return boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            aws_access_key_id="testkey",
            aws_secret_access_key=secret_key,
            region_name="us-east-1",
        )

    with start_s3(tmp_path / "s3", access_key="testkey", secret_key="testsecret") as s3:
        allowed = client(s3.url, "testsecret")
        allowed.create_bucket(Bucket="mri-scans")
        allowed.put_object(Bucket="mri-scans", Key="case/1.jpg", Body=b"\xff\xd8scan")
        body = allowed.get_object(Bucket="mri-scans", Key="case/1.jpg")["Body"].read()
        assert body == b"\xff\xd8scan"
        with pytest.raises(botocore.exceptions.ClientError):
            client(s3.url, "wrong-secret").list_buckets()
    assert_gone(s3.pid)


@pytest.mark.parametrize("owner_exit", ["returns", "is killed"])
def test_a_service_never_outlives_the_process_that_started_it(tmp_path, owner_exit):
    owner_script = textwrap.dedent(
        f"""
        import os, signal, sys
        from devstack.services import start_redis
        server = start_redis({str(tmp_path / "redis")!r})
        print(server.pid, flush=True)
        if {owner_exit == "is killed"}:
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    owner = subprocess.run(
        [sys.executable, "-c", owner_script],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    server_pid = int(owner.stdout.split()[0])
    assert_gone(server_pid)
