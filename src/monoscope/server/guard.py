"""The ASGI guard in front of the application: the API key on /v1 and /api, the body size limit (413) and
UTF-8 bodies (400), checked before the application reads a byte of JSON."""

from __future__ import annotations

import hmac

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import error_json

PROTECTED_PREFIXES = ("/v1", "/api")
DRAIN_LIMIT = 8  # bodies up to 8 x the limit are read and dropped before the 413; larger ones are not read


class Guard:
    """Checks the API key on /v1 and /api, refuses bodies over the limit (413) and bodies that are not UTF-8
    (400) before the application reads them."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body: int):
        self.app, self.api_key, self.max_body = app, api_key, max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if self.api_key and path.startswith(PROTECTED_PREFIXES) and not self._authorised(scope):
            await _reply(
                scope,
                receive,
                send,
                error_json(
                    401,
                    "missing or wrong API key: send the header `Authorization: Bearer KEY`",
                    "invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                ),
            )
            return
        if scope.get("method") in ("POST", "PUT", "PATCH"):
            body = await self._read_body(scope, receive, send)
            if body is None:
                return
            receive = _replay(body, receive)
        await self.app(scope, receive, send)

    async def _read_body(self, scope: Scope, receive: Receive, send: Send) -> bytes | None:
        """The whole body, or None when it has been answered here (too large, not UTF-8) or the client left."""
        length = _header(scope, b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await _reply(
                    scope, receive, send, error_json(400, "the Content-Length header is not a number", "invalid_header")
                )
                return None
            if declared > DRAIN_LIMIT * self.max_body:  # far too large: answer at once, without reading it
                await _reply(scope, receive, send, self._too_large())
                return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size <= self.max_body:
                chunks.append(chunk)
            elif size > DRAIN_LIMIT * self.max_body:
                break
            if not message.get("more_body", False):
                break
        if size > self.max_body:  # read (up to a point) and dropped, so that simple clients see the answer
            await _reply(scope, receive, send, self._too_large())
            return None
        body = b"".join(chunks)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as err:
            await _reply(
                scope,
                receive,
                send,
                error_json(
                    400, f"the body is not valid UTF-8 (byte {err.start}); send JSON encoded as UTF-8", "invalid_utf8"
                ),
            )
            return None
        return body

    def _too_large(self) -> Response:
        return error_json(
            413, f"the body is larger than {self.max_body:,} bytes; send a smaller request", "body_too_large"
        )

    def _authorised(self, scope: Scope) -> bool:
        header = _header(scope, b"authorization") or ""
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False
        return hmac.compare_digest(token.strip().encode(), str(self.api_key).encode())


async def _reply(scope: Scope, receive: Receive, send: Send, response: Response) -> None:
    response.headers["Connection"] = "close"
    await response(scope, receive, send)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
