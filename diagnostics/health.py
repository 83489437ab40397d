"""Liveness and readiness for load balancers, compose and Kubernetes.

`/healthz`: the process serves requests (touches nothing else, so a database outage does
not get healthy web containers restarted). `/readyz`: the database answers with every
migration applied, Redis answers and the bucket is reachable; 503 with the failing checks
otherwise, so traffic goes elsewhere until they recover.
"""

import concurrent.futures
import time

import redis
from django.conf import settings
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.http import JsonResponse

from diagnostics import storage

# One pool per process: checks run side by side, and a hung one costs a thread, not the request.
_checks_pool = concurrent.futures.ThreadPoolExecutor(max_workers=6, thread_name_prefix="readyz")


def _database() -> str:
    try:
        executor = MigrationExecutor(connection)
        pending = executor.migration_plan(executor.loader.graph.leaf_nodes())
    finally:
        # The check runs in a pool thread: give its connection back now.
        connection.close()
    if pending:
        raise RuntimeError(f"{len(pending)} migrations not applied")
    return "ok"


def _redis() -> str:
    client = redis.Redis.from_url(
        settings.CELERY_BROKER_URL,
        socket_connect_timeout=settings.READINESS_TIMEOUT_S,
        socket_timeout=settings.READINESS_TIMEOUT_S,
    )
    try:
        client.ping()
    finally:
        client.close()
    return "ok"


def _storage() -> str:
    storage._client().head_bucket(Bucket=settings.S3_BUCKET)
    return "ok"


READINESS_CHECKS = {"database": _database, "redis": _redis, "storage": _storage}


def readiness() -> tuple[bool, dict[str, str]]:
    """Run every check at once; each gets READINESS_TIMEOUT_S. Returns (ready, results)."""
    futures = {name: _checks_pool.submit(check) for name, check in READINESS_CHECKS.items()}
    deadline = time.monotonic() + settings.READINESS_TIMEOUT_S
    results = {}
    for name, future in futures.items():
        try:
            results[name] = future.result(timeout=max(deadline - time.monotonic(), 0.01))
        except concurrent.futures.TimeoutError:
            results[name] = f"no answer within {settings.READINESS_TIMEOUT_S:g} s"
        except Exception as exc:  # noqa: BLE001  (any failure means "not ready", with its cause)
            results[name] = f"{type(exc).__name__}: {exc}"[:300]
    return all(result == "ok" for result in results.values()), results


def healthz(request) -> JsonResponse:
    return JsonResponse({"status": "ok"})


def readyz(request) -> JsonResponse:
    ready, checks = readiness()
    return JsonResponse(
        {"status": "ok" if ready else "unavailable", "checks": checks},
        status=200 if ready else 503,
        headers=None if ready else {"Retry-After": "5"},
    )


def metrics(request):
    # django-prometheus' export view; with PROMETHEUS_MULTIPROC_DIR (set by gunicorn.conf.py)
    # it adds up every gunicorn worker's samples.
    from django_prometheus.exports import ExportToDjangoView

    return ExportToDjangoView(request)


OPERATIONAL_ENDPOINTS = {"/healthz": healthz, "/readyz": readyz, "/metrics": metrics}


class OperationalEndpointsMiddleware:
    """Answers the probe and scrape paths first in the chain: before the host check (probes
    and Prometheus use the container's own address, not a name in DJANGO_ALLOWED_HOSTS) and
    before the HTTPS redirect (they speak plain HTTP inside the network), and outside the
    request metrics (scrapes would drown the API's own traffic). Only GET and HEAD."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        endpoint = OPERATIONAL_ENDPOINTS.get(request.path.rstrip("/") or "/")
        if endpoint is not None and request.method in ("GET", "HEAD"):
            return endpoint(request)
        return self.get_response(request)
