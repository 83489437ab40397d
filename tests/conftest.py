"""Shared fixtures. Services are real: PostgreSQL and Redis from DATABASE_URL/REDIS_URL,
S3 from S3_ENDPOINT_URL (`./stack test` starts any that are not configured)."""

import socket
import uuid

import pytest
import redis
from django.conf import settings

from diagnostics import storage


@pytest.fixture(scope="session")
def s3_bucket(django_db_blocker):
    """A bucket of this test session's own on the real S3 server."""
    settings.S3_BUCKET = f"test-scans-{uuid.uuid4().hex[:12]}"
    storage.ensure_bucket()
    yield settings.S3_BUCKET


@pytest.fixture
def s3_keys(s3_bucket):
    """The keys this test added to the bucket."""
    before = set(storage.list_keys())
    return lambda: sorted(set(storage.list_keys()) - before)


@pytest.fixture
def s3_down(settings):
    """Point the storage client at a port where nothing listens."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    settings.S3_ENDPOINT_URL = f"http://127.0.0.1:{dead_port}"
    storage.clients_forget()
    yield
    storage.clients_forget()


@pytest.fixture
def broker():
    """The real Redis the jobs go to, with the queues (classify, celery) emptied before the test."""
    from workers.app import QUEUES

    client = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    client.delete(*QUEUES)
    yield client
    client.delete(*QUEUES)
    client.close()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A real (tiny, untrained) Keras classifier exported the way the shipped one is."""
    from ml.export import export_artifact
    from ml.model import build_model

    out = tmp_path_factory.mktemp("model") / "tiny-test-0"
    export_artifact(
        build_model("tiny", input_size=32), out, name="tiny-test", version="0", input_size=32
    )
    return out


@pytest.fixture(scope="session")
def tiny_classifier(tiny_model_dir):
    from ml.inference import load_classifier

    return load_classifier(tiny_model_dir)
