"""What services raise; the HTTP layer maps each to one status code."""

from __future__ import annotations


class ServiceError(Exception):
    status = 400

    def __init__(self, detail: str, *, errors: dict | None = None, headers: dict | None = None):
        super().__init__(detail)
        self.detail = detail
        self.errors = errors
        self.headers = headers or {}


class UnknownTaskType(ServiceError):
    status = 400


class InvalidParams(ServiceError):
    status = 422


class NotFound(ServiceError):
    status = 404


class Conflict(ServiceError):
    status = 409


class Unavailable(ServiceError):
    status = 503

    def __init__(self, detail: str, *, retry_after: int = 5, outcome: str = "unavailable",
                 **kwargs):
        super().__init__(detail, **kwargs)
        self.outcome = outcome
        self.headers.setdefault("Retry-After", str(retry_after))
