"""The S3 boundary: every byte of a scan goes through here (boto3, any S3-compatible server)."""

import functools

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from django.conf import settings


class StorageUnavailable(Exception):
    """The object store could not be reached or refused the request."""


@functools.cache
def _client():
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


def _call(operation, **kwargs):
    try:
        return getattr(_client(), operation)(Bucket=settings.S3_BUCKET, **kwargs)
    except (BotoCoreError, ClientError) as exc:
        raise StorageUnavailable(f"object storage {operation} failed: {exc}") from exc


def put(key: str, data: bytes, *, content_type: str, sha256: str) -> None:
    _call("put_object", Key=key, Body=data, ContentType=content_type, Metadata={"sha256": sha256})


def get(key: str) -> bytes:
    return _call("get_object", Key=key)["Body"].read()


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
