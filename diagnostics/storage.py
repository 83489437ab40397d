"""The S3 boundary: every byte of a scan goes through here (boto3, any S3-compatible server)."""

import functools
import threading
from xml.etree import ElementTree

import boto3
import urllib3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from django.conf import settings


class StorageUnavailable(Exception):
    """The object store could not be reached or refused the request."""


_making_client = threading.Lock()


def _client():
    # One per process, made by whichever thread asks first: making one loads S3's service
    # model (0.2 s of CPU), and threads that all asked at once would each make their own
    # (a worker's first batch took a second longer that way).
    with _making_client:
        return _new_client()


def connect() -> None:
    """Make this process's clients now, before the first request needs them."""
    _client()
    _http()


def clients_forget() -> None:
    """Drop this process's clients: the next request makes new ones from the settings."""
    _new_client.cache_clear()
    _http.cache_clear()


@functools.cache
def _new_client():
    # boto3 clients are thread-safe; one per process keeps connections pooled.
    return boto3.client(
        "s3",
        endpoint_url=settings.S3_ENDPOINT_URL,
        aws_access_key_id=settings.S3_ACCESS_KEY_ID,
        aws_secret_access_key=settings.S3_SECRET_ACCESS_KEY,
        region_name=settings.S3_REGION,
        config=Config(
            signature_version="s3v4",
            # Path-style works on MinIO and SeaweedFS without wildcard DNS.
            s3={"addressing_style": "path"},
            connect_timeout=3,
            read_timeout=30,
            retries={"max_attempts": 3, "mode": "standard"},
        ),
    )


# Reads are presigned by boto3 and fetched with urllib3 (botocore's own HTTP client):
# get_object spends about twice the CPU per call on building, hooking and parsing a request
# and its response (bench/storage_get.py), and a worker fetches every scan it classifies.
PRESIGNED_URL_TTL_S = 60


@functools.cache
def _http() -> urllib3.PoolManager:
    # Thread-safe, one per process (its connections are kept alive); the same timeouts and
    # number of attempts as the boto3 client's.
    return urllib3.PoolManager(
        maxsize=16,
        timeout=urllib3.Timeout(connect=3, read=30),
        retries=urllib3.Retry(
            total=2,
            backoff_factor=0.1,
            status_forcelist=(500, 502, 503, 504),
            raise_on_status=False,
        ),
    )


def _call(operation, **kwargs):
    try:
        return getattr(_client(), operation)(Bucket=settings.S3_BUCKET, **kwargs)
    except (BotoCoreError, ClientError) as exc:
        raise StorageUnavailable(f"object storage {operation} failed: {exc}") from exc


def put(key: str, data: bytes, *, content_type: str, sha256: str) -> None:
    _call("put_object", Key=key, Body=data, ContentType=content_type, Metadata={"sha256": sha256})


def get(key: str) -> bytes:
    url = _call_presigned("get_object", Key=key)
    try:
        response = _http().request("GET", url)
    except urllib3.exceptions.HTTPError as exc:
        # The reason, not the exception: that names the presigned URL, a credential while it
        # lives, and the cause is stored with the image and shown to its users.
        reason = getattr(exc, "reason", None) or type(exc).__name__
        raise StorageUnavailable(f"object storage get_object failed: {reason}") from exc
    if response.status != 200:
        raise StorageUnavailable(
            f"object storage get_object failed: HTTP {response.status} {_error_code(response.data)}"
        )
    return response.data


def _call_presigned(operation, **params) -> str:
    try:
        return _client().generate_presigned_url(
            operation,
            Params={"Bucket": settings.S3_BUCKET, **params},
            ExpiresIn=PRESIGNED_URL_TTL_S,
        )
    except (BotoCoreError, ClientError) as exc:
        raise StorageUnavailable(f"object storage {operation} failed: {exc}") from exc


def _error_code(body: bytes) -> str:
    """The <Code> of an S3 error document (NoSuchKey, AccessDenied, ...), or ''."""
    try:
        return ElementTree.fromstring(body).findtext("Code") or ""
    except ElementTree.ParseError:
        return ""


def exists(key: str) -> bool:
    try:
        _client().head_object(Bucket=settings.S3_BUCKET, Key=key)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            return False
        raise StorageUnavailable(f"object storage head_object failed: {exc}") from exc
    except BotoCoreError as exc:
        raise StorageUnavailable(f"object storage head_object failed: {exc}") from exc
    return True


def delete_many(keys: list[str]) -> None:
    if keys:
        _call("delete_objects", Delete={"Objects": [{"Key": key} for key in keys], "Quiet": True})


def list_keys(prefix: str = "") -> list[str]:
    paginator = _client().get_paginator("list_objects_v2")
    try:
        pages = paginator.paginate(Bucket=settings.S3_BUCKET, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]
    except (BotoCoreError, ClientError) as exc:
        raise StorageUnavailable(f"object storage list failed: {exc}") from exc


def ensure_bucket() -> bool:
    """Create the bucket if it is missing; True when it was created."""
    client = _client()
    try:
        client.head_bucket(Bucket=settings.S3_BUCKET)
        return False
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound"):
            raise StorageUnavailable(f"object storage head_bucket failed: {exc}") from exc
    except BotoCoreError as exc:
        raise StorageUnavailable(f"object storage head_bucket failed: {exc}") from exc
    _client().create_bucket(Bucket=settings.S3_BUCKET)
    return True
