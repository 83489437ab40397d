from django.db import InterfaceError, OperationalError
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from diagnostics.errors import DomainError


def exception_handler(exc, context):
    """DRF's handler, plus our domain errors and an unreachable database as clear 4xx/503."""
    if isinstance(exc, DomainError):
        return Response({"detail": exc.detail, "code": exc.code}, status=exc.status_code)
    if isinstance(exc, (OperationalError, InterfaceError)):
        return Response(
            {"detail": "the database is unavailable, retry later", "code": "unavailable"},
            status=503,
            headers={"Retry-After": "5"},
        )
    return drf_exception_handler(exc, context)
