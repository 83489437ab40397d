"""Structured logs: one JSON object per record, carrying the case id from the API request
that created or read a case through to the worker that classifies it.

The case id travels in a context variable: `RequestLogMiddleware` sets it from the URL (or
from the case an upload created), the worker sets it before each task (workers/observability.py),
and `ContextFilter` copies it onto every record. Only ids, statuses and timings are logged:
never file names, study references or image bytes, which can carry patient data.
"""

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from pythonjsonlogger.json import JsonFormatter as _JsonFormatter

_case_id: ContextVar[str | None] = ContextVar("log_case_id", default=None)
_task_id: ContextVar[str | None] = ContextVar("log_task_id", default=None)

request_logger = logging.getLogger("diagnostics.requests")


def case_id_set(case_id) -> None:
    """Tag the rest of this request or task's records with the case."""
    _case_id.set(str(case_id) if case_id else None)


@contextmanager
def case_context(case_id) -> Iterator[None]:
    """Tag the records written inside with the case, keeping the task id: a worker's
    batch holds images of many cases."""
    token = _case_id.set(str(case_id) if case_id else None)
    try:
        yield
    finally:
        _case_id.reset(token)


@contextmanager
def log_context(*, case_id=None, task_id=None) -> Iterator[None]:
    case_token = _case_id.set(str(case_id) if case_id else None)
    task_token = _task_id.set(task_id)
    try:
        yield
    finally:
        _case_id.reset(case_token)
        _task_id.reset(task_token)


class ContextFilter(logging.Filter):
    """Adds `case_id` and `task_id` to every record ("-" in plain text when there is none)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "case_id"):
            record.case_id = _case_id.get() or "-"
        if not hasattr(record, "task_id"):
            record.task_id = _task_id.get() or "-"
        return True


class JsonFormatter(_JsonFormatter):
    """`{"time", "level", "logger", "message", "case_id"?, "task_id"?, ...extra}`."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("timestamp", "time")
        kwargs.setdefault(
            "rename_fields", {"levelname": "level", "name": "logger", "exc_info": "exception"}
        )
        super().__init__("%(levelname)s %(name)s %(message)s", *args, **kwargs)

    def add_fields(self, log_data, record, message_dict):
        super().add_fields(log_data, record, message_dict)
        # "-" is the plain format's placeholder; in JSON an absent key says the same.
        for key in ("case_id", "task_id"):
            if log_data.get(key) in (None, "-"):
                log_data.pop(key, None)


class RequestLogMiddleware:
    """Logs one line per API or admin request: method, route, status, duration and the case.

    The case id comes from the URL (`<uuid:case_id>`) or, for an upload, from the case in
    the response. The query string is left out (it is the client's to fill).
    """

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        started = time.perf_counter()
        token = _case_id.set(None)
        try:
            response = self.get_response(request)
            if _case_id.get() is None:
                case_id_set(_case_id_in(response))
            match = getattr(request, "resolver_match", None)
            request_logger.info(
                "%s %s %s",
                request.method,
                match.route if match else "(unrouted)",
                response.status_code,
                extra={
                    "method": request.method,
                    "route": match.route if match else None,
                    "status": response.status_code,
                    "duration_ms": round((time.perf_counter() - started) * 1000, 1),
                    "user_id": getattr(request.user, "id", None)
                    if hasattr(request, "user")
                    else None,
                },
            )
            return response
        finally:
            _case_id.reset(token)

    def process_view(self, request, view_func, view_args, view_kwargs):
        if "case_id" in view_kwargs:
            case_id_set(view_kwargs["case_id"])


def _case_id_in(response) -> str | None:
    data = getattr(response, "data", None)
    if isinstance(data, dict) and "images" in data and "id" in data:
        return str(data["id"])
    return None
