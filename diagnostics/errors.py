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
