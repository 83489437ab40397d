from django.core.exceptions import RequestDataTooBig, SuspiciousOperation, TooManyFilesSent
from django.db import InterfaceError, OperationalError
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from diagnostics.errors import DomainError


def _error(detail: str, code: str, status: int, **headers) -> Response:
    return Response({"detail": detail, "code": code}, status=status, headers=headers or None)


def exception_handler(exc, context):
    """DRF's handler, plus our domain errors, request-size guards and an unreachable
    database as clear JSON errors instead of Django's HTML pages or a 500."""
    if isinstance(exc, DomainError):
        return _error(exc.detail, exc.code, exc.status_code)
    if isinstance(exc, TooManyFilesSent):
        from django.conf import settings

        return _error(
            f"too many files in one request; the limit is {settings.DATA_UPLOAD_MAX_NUMBER_FILES}",
            "too_many_files",
            400,
        )
    if isinstance(exc, RequestDataTooBig):
        return _error("the request body is larger than the server accepts", "too_large", 413)
    if isinstance(exc, SuspiciousOperation):
        return _error("the request is malformed", "malformed", 400)
    if isinstance(exc, (OperationalError, InterfaceError)):
        return _error(
            "the database is unavailable, retry later", "unavailable", 503, **{"Retry-After": "5"}
        )
    return drf_exception_handler(exc, context)
