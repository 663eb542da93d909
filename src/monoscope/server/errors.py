"""The server's answers other than 200, shared by the services and the HTTP routes.

Every one has the OpenAI error shape `{"error": {"message", "type", "param", "code"}}` and a 4xx status for
anything the client can fix; `install_error_handlers` maps every exception the routes can raise to one.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import MonoscopeError
from . import schemas as S


class ApiError(Exception):
    """An answer other than 200: status, one-line message, machine-readable code, the field at fault."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None, kind: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.kind = kind or {401: "authentication_error", 404: "not_found_error", 503: "server_busy"}.get(
            status, "invalid_request_error" if status < 500 else "server_error"
        )


class Cancelled(Exception):
    """The client went away before or while its job ran."""


ERROR_RESPONSES: dict[int, dict[str, Any]] = {
    400: {
        "model": S.ErrorResponse,
        "description": "Invalid request (bad JSON, out-of-range values, unknown feature ids, ...).",
    },
    401: {"model": S.ErrorResponse, "description": "Missing or wrong API key (only when the server runs with one)."},
    404: {"model": S.ErrorResponse, "description": "Unknown feature, SAE or model."},
    413: {"model": S.ErrorResponse, "description": "Body larger than the limit (1 MB by default)."},
    503: {
        "model": S.ErrorResponse,
        "description": "The model's queue is full (or the server is shutting down); retry after the Retry-After seconds.",
    },
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The documented error answers of a route (for its `responses=`)."""
    return {c: ERROR_RESPONSES[c] for c in codes}


def error_json(
    status: int,
    message: str,
    code: str,
    kind: str | None = None,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    kind = kind or ApiError(status, message, code).kind
    body = S.ErrorResponse(error=S.ErrorDetail(message=message, type=kind, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def error_event(err: BaseException) -> S.ErrorResponse:
    """The error event that ends a stream which fails after its first bytes went out."""
    if isinstance(err, ApiError):
        return S.ErrorResponse(error=S.ErrorDetail(message=err.message, type=err.kind, param=err.param, code=err.code))
    return S.ErrorResponse(
        error=S.ErrorDetail(message=str(err), type="server_error", param=None, code="generation_failed")
    )


def describe_validation(errors: Iterable[Mapping[str, Any]]) -> tuple[str, str, str | None]:
    """(one-line message, code, param) for pydantic/FastAPI validation errors."""
    errors = list(errors)
    if not errors:
        return "invalid request", "invalid_request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error") or "it does not parse"
        return f"the body is not valid JSON ({detail})", "invalid_json", None
    parts, param = [], None
    for e in errors[:5]:
        loc = [str(x) for x in e.get("loc", ()) if x not in ("body", "query", "path")]
        where = ".".join(loc)
        if param is None and where:
            param = where
        msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        if e.get("type") == "missing" and loc == []:
            msg = "the request needs a JSON body"
        if where in ("", "body") and e.get("type") in ("model_attributes_type", "dict_type"):
            msg = "the body must be a JSON object"
        parts.append(f"{where}: {msg}" if where else msg)
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "; ".join(parts) + more, "invalid_request", param


def install_error_handlers(app: FastAPI) -> None:
    """Answer every exception a route can raise in the OpenAI error shape (4xx for what the client can fix)."""

    async def api_error(request: Request, err: Exception) -> JSONResponse:
        assert isinstance(err, ApiError)
        headers = {"Retry-After": "1"} if err.status == 503 else None
        return error_json(err.status, err.message, err.code, err.kind, err.param, headers)

    async def monoscope_error(request: Request, err: Exception) -> JSONResponse:
        return error_json(400, str(err), "invalid_request")

    async def cancelled(request: Request, err: Exception) -> JSONResponse:
        return error_json(499, "the request was cancelled", "cancelled")

    async def invalid(request: Request, err: Exception) -> JSONResponse:
        assert isinstance(err, RequestValidationError)
        message, code, param = describe_validation(err.errors())
        return error_json(400, message, code, param=param)

    async def http_error(request: Request, err: Exception) -> JSONResponse:
        assert isinstance(err, StarletteHTTPException)
        if err.status_code == 404:
            return error_json(404, f"no route {request.url.path}; see /docs for the API", "not_found")
        if err.status_code == 405:
            return error_json(
                405,
                f"{request.method} is not allowed on {request.url.path}",
                "method_not_allowed",
                kind="invalid_request_error",
            )
        return error_json(err.status_code, str(err.detail), "http_error")

    async def unexpected(request: Request, err: Exception) -> JSONResponse:
        return error_json(500, f"internal error: {type(err).__name__}: {err}", "internal_error", kind="server_error")

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(MonoscopeError, monoscope_error)
    app.add_exception_handler(Cancelled, cancelled)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
