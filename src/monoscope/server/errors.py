"""The server's answers other than 200, shared by the model worker, the service and the HTTP routes."""

from __future__ import annotations


class ApiError(Exception):
    """An answer other than 200: status, one-line message, machine-readable code, the field at fault."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None, kind: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.kind = kind or {401: "authentication_error", 404: "not_found_error", 503: "server_busy"}.get(status, "invalid_request_error" if status < 500 else "server_error")


class Cancelled(Exception):
    """The client went away before or while its job ran."""
