"""Errors the services raise on purpose; the API maps each to a status code and a reason."""


class DomainError(Exception):
    status_code = 400
    code = "invalid"

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


class InvalidUpload(DomainError):
    code = "invalid_image"


class UploadTooLarge(DomainError):
    status_code = 413
    code = "too_large"


class ServiceUnavailable(DomainError):
    status_code = 503
    code = "unavailable"


class Forbidden(DomainError):
    status_code = 403
    code = "forbidden"


class NotFound(DomainError):
    status_code = 404
    code = "not_found"


class Conflict(DomainError):
    """Someone else changed the row since the client read it (optimistic locking), or the
    row is in a state that does not allow the operation."""

    status_code = 409
    code = "conflict"
