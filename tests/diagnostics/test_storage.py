"""The S3 boundary against the real SeaweedFS server (and, for server errors, a stand-in
that answers 500, which a real S3 cannot be made to do)."""

import http.server
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from diagnostics import storage


@pytest.fixture
def fresh_clients():
    """Clients made after a test changed settings; none of them kept for later tests."""
    storage.clients_forget()
    yield
    storage.clients_forget()


def test_get_returns_the_bytes_that_were_put(s3_bucket):
    data = os.urandom(50_000)
    storage.put("tests/storage/round-trip", data, content_type="image/jpeg", sha256="-")

    assert storage.get("tests/storage/round-trip") == data


def test_get_of_a_missing_key_names_the_s3_error(s3_bucket):
    with pytest.raises(storage.StorageUnavailable) as raised:
        storage.get("tests/storage/never-written")

    assert str(raised.value) == "object storage get_object failed: HTTP 404 NoSuchKey"


def test_get_with_a_wrong_secret_is_refused_by_the_server(s3_bucket, settings, fresh_clients):
    storage.put("tests/storage/secret", b"scan", content_type="image/jpeg", sha256="-")
    settings.S3_SECRET_ACCESS_KEY = "not-the-secret"
    storage.clients_forget()

    with pytest.raises(storage.StorageUnavailable) as raised:
        storage.get("tests/storage/secret")

    assert str(raised.value) == "object storage get_object failed: HTTP 403 SignatureDoesNotMatch"


def test_get_with_s3_down_says_why_without_the_signed_url(s3_down):
    with pytest.raises(storage.StorageUnavailable) as raised:
        storage.get("tests/storage/anything")

    message = str(raised.value)
    assert message.startswith("object storage get_object failed: ")
    assert "Connection refused" in message
    # A presigned URL is a credential while it lives; the cause is stored and shown to users.
    assert "Signature" not in message and "Credential" not in message


class _AlwaysFailing(http.server.BaseHTTPRequestHandler):
    requests = 0

    def do_GET(self):  # noqa: N802  (http.server's name)
        type(self).requests += 1
        body = b"<Error><Code>InternalError</Code><Message>try again</Message></Error>"
        self.send_response(500)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_a_server_error_is_tried_three_times_then_named(settings, fresh_clients):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _AlwaysFailing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    settings.S3_ENDPOINT_URL = f"http://127.0.0.1:{server.server_port}"
    storage.clients_forget()
    try:
        with pytest.raises(storage.StorageUnavailable) as raised:
            storage.get("tests/storage/anything")
    finally:
        server.shutdown()
        server.server_close()

    assert str(raised.value) == "object storage get_object failed: HTTP 500 InternalError"
    assert _AlwaysFailing.requests == 3


def test_threads_asking_at_once_share_one_new_client(monkeypatch, fresh_clients):
    made = []
    real_client = storage.boto3.client

    def slow_client(*args, **kwargs):
        made.append(1)
        time.sleep(0.05)  # long enough for every thread to ask while the first one makes it
        return real_client(*args, **kwargs)

    monkeypatch.setattr(storage.boto3, "client", slow_client)
    with ThreadPoolExecutor(8) as pool:
        clients = list(pool.map(lambda _: storage._client(), range(8)))

    assert len(made) == 1
    assert all(client is clients[0] for client in clients)
