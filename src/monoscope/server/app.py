"""The FastAPI application: OpenAI-compatible /v1, monoscope's /api, and the web UI at /.

`create_app(service)` builds it around a loaded `Service`; `create_app(None)` builds the same routes without
a model (enough for the OpenAPI schema). Every answer that is not 200 has the OpenAI error shape
`{"error": {"message", "type", "param", "code"}}` and a 4xx status for anything the client can fix.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Optional

import anyio
from fastapi import FastAPI, Query, Request
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.middleware.gzip import GZipMiddleware
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import MonoscopeError
from . import schemas as S
from .errors import ApiError, Cancelled
from .service import Service, default_max_tokens, new_id
from .worker import GenerationJob

STATIC_DIR = Path(__file__).with_name("static")
PROTECTED_PREFIXES = ("/v1", "/api")
DRAIN_LIMIT = 8  # bodies up to 8 x the limit are read and dropped before the 413; larger ones are not read

_ERRORS = {
    400: {"model": S.ErrorResponse, "description": "Invalid request (bad JSON, out-of-range values, unknown feature ids, ...)."},
    401: {"model": S.ErrorResponse, "description": "Missing or wrong API key (only when the server runs with one)."},
    404: {"model": S.ErrorResponse, "description": "Unknown feature, SAE or model."},
    413: {"model": S.ErrorResponse, "description": "Body larger than the limit (1 MB by default)."},
    503: {"model": S.ErrorResponse, "description": "The model's queue is full (or the server is shutting down); retry after the Retry-After seconds."},
}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {c: _ERRORS[c] for c in codes}


def error_json(status: int, message: str, code: str, kind: str | None = None, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    kind = kind or ApiError(status, message, code).kind
    body = S.ErrorResponse(error=S.ErrorDetail(message=message, type=kind, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


# ---------------------------------------------------------------- ASGI guard: API key, body size, UTF-8


class Guard:
    """Checks the API key on /v1 and /api, refuses bodies over the limit (413) and bodies that are not UTF-8
    (400) before the application reads them."""

    def __init__(self, app: Any, api_key: str | None, max_body: int):
        self.app, self.api_key, self.max_body = app, api_key, max_body

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if self.api_key and path.startswith(PROTECTED_PREFIXES):
            if not self._authorised(scope):
                await self._reply(scope, receive, send, error_json(401, "missing or wrong API key: send the header `Authorization: Bearer KEY`",
                                                                   "invalid_api_key", headers={"WWW-Authenticate": "Bearer"}))
                return
        if scope.get("method") in ("POST", "PUT", "PATCH"):
            length = _header(scope, b"content-length")
            declared = None
            if length is not None:
                try:
                    declared = int(length)
                except ValueError:
                    await self._reply(scope, receive, send, error_json(400, "the Content-Length header is not a number", "invalid_header"))
                    return
                if declared > DRAIN_LIMIT * self.max_body:  # far too large: answer at once, without reading it
                    await self._reply(scope, receive, send, self._too_large())
                    return
            chunks, size = [], 0
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunk = message.get("body", b"")
                size += len(chunk)
                if size <= self.max_body:
                    chunks.append(chunk)
                elif size > DRAIN_LIMIT * self.max_body:
                    break
                if not message.get("more_body", False):
                    break
            if size > self.max_body:  # read (up to a point) and dropped, so that simple clients see the answer
                await self._reply(scope, receive, send, self._too_large())
                return
            body = b"".join(chunks)
            try:
                body.decode("utf-8")
            except UnicodeDecodeError as err:
                await self._reply(scope, receive, send, error_json(400, f"the body is not valid UTF-8 (byte {err.start}); send JSON encoded as UTF-8", "invalid_utf8"))
                return
            receive = _replay(body, receive)
        await self.app(scope, receive, send)

    def _too_large(self) -> JSONResponse:
        return error_json(413, f"the body is larger than {self.max_body:,} bytes; send a smaller request", "body_too_large")

    def _authorised(self, scope: dict) -> bool:
        header = _header(scope, b"authorization") or ""
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False
        return hmac.compare_digest(token.strip().encode(), str(self.api_key).encode())

    async def _reply(self, scope: dict, receive: Callable, send: Callable, response: Response) -> None:
        response.headers["Connection"] = "close"
        await response(scope, receive, send)


def _header(scope: dict, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _replay(body: bytes, receive: Callable) -> Callable:
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


# ---------------------------------------------------------------- streaming


class EventStream(StreamingResponse):
    """Server-sent events that set `cancel` as soon as the client disconnects."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], cancel: threading.Event):
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.cancel = cancel

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        async with anyio.create_task_group() as group:

            async def watch() -> None:
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        self.cancel.set()
                        group.cancel_scope.cancel()
                        return

            group.start_soon(watch)
            try:
                await self.stream_response(send)
            except OSError:
                self.cancel.set()
            finally:
                group.cancel_scope.cancel()


def _sse(payload: Any) -> str:
    data = payload.model_dump_json(exclude_none=False) if hasattr(payload, "model_dump_json") else json.dumps(payload)
    return f"data: {data}\n\n"


async def _wait(fut: Future, request: Request, cancel: threading.Event) -> Any:
    """The result of a model job; sets `cancel` (and gives up) when the client disconnects meanwhile."""
    wrapped = asyncio.wrap_future(fut)
    while True:
        done, _ = await asyncio.wait({wrapped}, timeout=0.25)
        if done:
            return wrapped.result()
        if await request.is_disconnected():
            cancel.set()
            fut.cancel()
            raise Cancelled()


# ---------------------------------------------------------------- the application


def create_app(service: Service | None, *, api_key: str | None = None, max_body: int | None = None) -> Any:
    """The ASGI application (the FastAPI app inside the `Guard`; `fastapi_app()` unwraps it)."""
    max_body = max_body or (service.max_body_bytes if service is not None else S.MAX_BODY_BYTES)
    app = FastAPI(
        docs_url=None,  # /docs is served from the package (the built-in pages load their scripts from a CDN)
        redoc_url=None,
        title="monoscope",
        version=__version__,
        summary="Browse and steer the sparse-autoencoder features of a language model.",
        description="An OpenAI-compatible API (`/v1`) whose completions take a `steering` extension "
                    "(`[{\"feature\": 123, \"mode\": \"clamp\", \"value\": \"8x\"}]`), monoscope's feature API (`/api`) and a web UI (`/`). "
                    "When the server runs with an API key, /v1 and /api need `Authorization: Bearer KEY`.",
        openapi_tags=[{"name": "openai", "description": "OpenAI-compatible endpoints (with the steering extension)."},
                      {"name": "features", "description": "The feature database: dashboards, search, map."},
                      {"name": "model", "description": "Endpoints that run the model: scan, search by example, attribution."},
                      {"name": "server", "description": "What is served, and how busy it is."}],
    )
    app.state.service = service
    app.state.api_key = api_key
    app.add_middleware(GZipMiddleware, minimum_size=4096)  # event streams are never compressed

    def svc() -> Service:
        if service is None:
            raise ApiError(503, "no model is loaded", "no_model")
        return service

    # ---- errors

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError) -> JSONResponse:
        headers = {"Retry-After": "1"} if err.status == 503 else None
        return error_json(err.status, err.message, err.code, err.kind, err.param, headers)

    @app.exception_handler(MonoscopeError)
    async def _monoscope_error(request: Request, err: MonoscopeError) -> JSONResponse:
        return error_json(400, str(err), "invalid_request")

    @app.exception_handler(Cancelled)
    async def _cancelled(request: Request, err: Cancelled) -> JSONResponse:
        return error_json(499, "the request was cancelled", "cancelled")

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        message, code, param = describe_validation(err.errors())
        return error_json(400, message, code, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException) -> JSONResponse:
        if err.status_code == 404:
            return error_json(404, f"no route {request.url.path}; see /docs for the API", "not_found")
        if err.status_code == 405:
            return error_json(405, f"{request.method} is not allowed on {request.url.path}", "method_not_allowed", kind="invalid_request_error")
        return error_json(err.status_code, str(err.detail), "http_error")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception) -> JSONResponse:
        return error_json(500, f"internal error: {type(err).__name__}: {err}", "internal_error", kind="server_error")

    # ---- OpenAI-compatible

    @app.get("/v1/models", response_model=S.ModelList, tags=["openai"], responses=_errors(401))
    def list_models() -> S.ModelList:
        s = svc()
        return S.ModelList(data=[S.ModelCard(id=s.served_name, created=s.created)])

    @app.post("/v1/chat/completions", response_model=S.ChatCompletion, tags=["openai"], responses=_errors(400, 401, 404, 413, 503),
              summary="Chat completion (streaming with stream=true), optionally steered")
    async def chat_completions(body: S.ChatCompletionRequest, request: Request) -> Any:
        s = svc()
        s.check_model(body.model)
        steering, applied = s.steering(body.steering, body.steering_strength, body.steering_positions)
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        job = GenerationJob(messages=messages, prompt=None, max_tokens=_max_tokens(s, body.max_completion_tokens or body.max_tokens, "chat"),
                            temperature=_temperature(body.temperature), top_p=body.top_p, seed=body.seed, stops=body.stops(),
                            steering=steering, ignore_eos=body.ignore_eos)
        rid, created = new_id("chatcmpl"), int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return await _stream(s, job, request, rid, created, "chat", include_usage)
        result = await _wait(s.generate(job), request, job.cancel)
        return S.ChatCompletion(
            id=rid, created=created, model=s.served_name, steering=applied,
            choices=[S.ChatChoice(message=S.AssistantMessage(content=result.text), finish_reason=result.finish_reason)],
            usage=S.Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                          total_tokens=result.prompt_tokens + result.completion_tokens),
        )

    @app.post("/v1/completions", response_model=S.Completion, tags=["openai"], responses=_errors(400, 401, 404, 413, 503),
              summary="Text completion of a raw prompt (streaming with stream=true), optionally steered")
    async def completions(body: S.CompletionRequest, request: Request) -> Any:
        s = svc()
        s.check_model(body.model)
        steering, applied = s.steering(body.steering, body.steering_strength, body.steering_positions)
        job = GenerationJob(messages=None, prompt=body.text(), max_tokens=_max_tokens(s, body.max_tokens, "completion"),
                            temperature=_temperature(body.temperature), top_p=body.top_p, seed=body.seed, stops=body.stops(),
                            steering=steering, ignore_eos=body.ignore_eos)
        rid, created = new_id("cmpl"), int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return await _stream(s, job, request, rid, created, "completion", include_usage)
        result = await _wait(s.generate(job), request, job.cancel)
        return S.Completion(
            id=rid, created=created, model=s.served_name, steering=applied,
            choices=[S.CompletionChoice(text=result.text, finish_reason=result.finish_reason)],
            usage=S.Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                          total_tokens=result.prompt_tokens + result.completion_tokens),
        )

    # ---- server

    @app.get("/health", response_model=S.Health, tags=["server"], summary="Liveness (never needs a key)")
    def health() -> S.Health:
        return S.Health()

    @app.get("/api/info", response_model=S.ServerInfo, tags=["server"], responses=_errors(401))
    def info() -> S.ServerInfo:
        return svc().info(auth=bool(api_key))

    @app.get("/api/stats", response_model=S.ServerStats, tags=["server"], responses=_errors(401))
    def stats() -> S.ServerStats:
        return svc().stats_out()

    # ---- features

    @app.get("/api/features", response_model=S.FeatureList, tags=["features"], responses=_errors(400, 401, 404),
             summary="Feature summaries: by ids, or a page of all features")
    def features(
        sae: Optional[str] = Query(None, max_length=200, description="SAE id (default: the first served)."),
        ids: Optional[str] = Query(None, max_length=20_000, description="Comma-separated feature ids, e.g. 3,17,42 (at most 1000)."),
        offset: int = Query(0, ge=0, le=10_000_000),
        limit: int = Query(50, ge=1, le=1000),
        order: str = Query("id", pattern="^(id|density|max_activation)$", description="id, density or max_activation (the last two descending)."),
    ) -> S.FeatureList:
        s = svc()
        served = s.sae(sae)
        store = served.require_store()
        if ids is not None:
            wanted = _parse_ids(ids, served)
            return S.FeatureList(sae=served.id, total=served.d_sae, offset=0, features=s.summaries(served, wanted))
        if order == "id":
            page = list(range(offset, min(served.d_sae, offset + limit)))
        else:
            column = store.column(order)
            import numpy as np

            page = [int(i) for i in np.argsort(-np.nan_to_num(column, nan=-1.0), kind="stable")[offset : offset + limit]]
        return S.FeatureList(sae=served.id, total=served.d_sae, offset=offset, features=s.summaries(served, page))

    @app.get("/api/features/{feature_id}", response_model=S.FeatureDashboard, tags=["features"], responses=_errors(400, 401, 404),
             summary="A feature's dashboard: label, examples, histogram, logit effects, neighbours")
    def feature(feature_id: int = PathParam(..., ge=0, le=2**31), sae: Optional[str] = Query(None, max_length=200),
                n_top: int = Query(20, ge=1, le=100, description="Top examples to return.")) -> S.FeatureDashboard:
        s = svc()
        return s.dashboard(s.sae(sae), feature_id, n_top)

    @app.get("/api/features/{feature_id}/neighbours", response_model=S.NeighbourList, tags=["features"], responses=_errors(400, 401, 404),
             summary="Nearest features by decoder cosine")
    def neighbours(feature_id: int = PathParam(..., ge=0, le=2**31), sae: Optional[str] = Query(None, max_length=200)) -> S.NeighbourList:
        s = svc()
        served = s.sae(sae)
        return S.NeighbourList(sae=served.id, feature=feature_id, neighbours=s.neighbours(served, feature_id))

    @app.get("/api/features/{feature_id}/family", response_model=S.FamilyResponse, tags=["features"], responses=_errors(400, 401, 404),
             summary="The feature's closest features in the other served SAEs of the same hook point (feature splitting)")
    def family(feature_id: int = PathParam(..., ge=0, le=2**31), sae: Optional[str] = Query(None, max_length=200),
               top: int = Query(5, ge=1, le=50, description="Matches per SAE.")) -> S.FamilyResponse:
        s = svc()
        return s.family(s.sae(sae), feature_id, top)

    @app.get("/api/search", response_model=S.SearchResponse, tags=["features"], responses=_errors(400, 401, 404),
             summary="Search features by the words or the meaning of their labels")
    def search(q: str = Query(..., min_length=1, max_length=500, description="Words to look for."),
               mode: str = Query("hybrid", pattern="^(hybrid|words|meaning)$", description="hybrid (words and meaning fused), words or meaning."),
               sae: Optional[str] = Query(None, max_length=200), limit: int = Query(20, ge=1, le=200)) -> S.SearchResponse:
        s = svc()
        if not q.strip():
            raise ApiError(400, "give some words to search for", "empty_query", "q")
        return s.search(s.sae(sae), q, mode, limit)

    @app.get("/api/map", response_model=S.MapResponse, tags=["features"], responses=_errors(400, 401, 404),
             summary="2-D map coordinates of every feature")
    def feature_map(sae: Optional[str] = Query(None, max_length=200)) -> S.MapResponse:
        s = svc()
        return s.feature_map(s.sae(sae))

    # ---- model jobs

    @app.post("/api/search/examples", response_model=S.ExampleSearchResponse, tags=["model"], responses=_errors(400, 401, 404, 413, 503),
              summary="Features that fire on example texts (more than on the corpus or on contrast texts)")
    async def search_examples(body: S.ExampleSearchRequest, request: Request) -> S.ExampleSearchResponse:
        s = svc()
        served = s.sae(body.sae)
        return await _wait(s.submit(s.run_example_search, served, body), request, threading.Event())

    @app.post("/api/scan", response_model=S.ScanResponse, tags=["model"], responses=_errors(400, 401, 404, 413, 503),
              summary="Which features fire on each token of a text")
    async def scan(body: S.ScanRequest, request: Request) -> S.ScanResponse:
        s = svc()
        if not body.text.strip():
            raise ApiError(400, "the text to scan is empty", "empty_text", "text")
        served = s.sae(body.sae)
        return await _wait(s.submit(s.run_scan, served, body), request, threading.Event())

    @app.post("/api/attribute", response_model=S.AttributionResponse, tags=["model"], responses=_errors(400, 401, 404, 413, 503),
              summary="Which features push the model toward the tokens of a completion")
    async def attribute(body: S.AttributionRequest, request: Request) -> S.AttributionResponse:
        s = svc()
        served = s.sae(body.sae)
        return await _wait(s.submit(s.run_attribution, served, body), request, threading.Event())

    @app.post("/api/suggest", response_model=S.SuggestResponse, tags=["model"], responses=_errors(400, 401, 404, 413, 503),
              summary="What steers the model toward a concept: features (or a learned vector) chosen by their effect on generated text")
    async def suggest(body: S.SuggestRequest, request: Request) -> S.SuggestResponse:
        s = svc()
        served = s.sae(body.sae)
        return await _wait(s.submit(s.run_suggest, served, body), request, threading.Event())

    # ---- the web UI

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/docs", include_in_schema=False)
    def docs() -> FileResponse:
        return FileResponse(STATIC_DIR / "docs.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return Guard(app, api_key, max_body)  # type: ignore[return-value]


# ---------------------------------------------------------------- request helpers


def _max_tokens(s: Service, value: int | None, kind: str) -> int:
    if value is None:
        return default_max_tokens(kind, s.max_tokens_limit)
    if value > s.max_tokens_limit:
        raise ApiError(400, f"max_tokens is {value}, above this server's limit of {s.max_tokens_limit}", "max_tokens_too_large", "max_tokens")
    return int(value)


def _temperature(value: float | None) -> float:
    return 1.0 if value is None else float(value)


def _parse_ids(text: str, served: Any) -> list[int]:
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            value = int(part)
        except ValueError:
            raise ApiError(400, f"feature id {part!r} is not a whole number", "invalid_feature_id", "ids") from None
        if value < 0:
            raise ApiError(400, f"feature id {value} is negative", "invalid_feature_id", "ids")
        out.append(served.check_feature(value, "ids"))
    if len(out) > 1000:
        raise ApiError(400, "at most 1000 ids at a time", "too_many_ids", "ids")
    return out


def describe_validation(errors: Any) -> tuple[str, str, str | None]:
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


async def _stream(s: Service, job: GenerationJob, request: Request, rid: str, created: int, kind: str, include_usage: bool) -> Response:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    def deliver(item: tuple) -> None:  # from the model thread
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (shutting down): nobody reads this stream any more
            job.cancel.set()

    job.on_event = deliver
    future = s.generate(job)
    future.add_done_callback(lambda f: deliver(("end", f)))
    # Wait until the job starts (or fails) before answering: errors still get their own status code.
    while True:
        try:
            first = await asyncio.wait_for(queue.get(), timeout=0.25)
            break
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancel.set()
                future.cancel()
                raise Cancelled() from None
    if first[0] == "end":
        f: Future = first[1]
        if f.cancelled():
            raise Cancelled()
        exc = f.exception()
        if exc is not None:
            raise exc
    model = s.served_name

    def chunk(delta: str | None = None, finish: str | None = None, role: bool = False, usage: S.Usage | None = None, empty: bool = False) -> str:
        if kind == "chat":
            choices = [] if empty else [S.ChatChunkChoice(delta=S.ChatDelta(role="assistant" if role else None, content=delta), finish_reason=finish)]
            return _sse(S.ChatCompletionChunk(id=rid, created=created, model=model, choices=choices, usage=usage))
        choices_c = [] if empty else [S.CompletionChoice(text=delta or "", finish_reason=finish)]
        return _sse(S.Completion(id=rid, created=created, model=model, choices=choices_c, usage=usage))

    async def events() -> AsyncIterator[str]:
        try:
            if kind == "chat":
                yield chunk("", role=True)
            item = first
            while True:
                if item[0] == "text":
                    yield chunk(item[1])
                elif item[0] == "end":
                    f = item[1]
                    exc = None if f.cancelled() else f.exception()
                    if f.cancelled() or isinstance(exc, Cancelled):
                        return
                    if exc is not None:
                        message = exc.message if isinstance(exc, ApiError) else str(exc)
                        code = exc.code if isinstance(exc, ApiError) else "generation_failed"
                        error_type = exc.kind if isinstance(exc, ApiError) else "server_error"
                        yield _sse(S.ErrorResponse(error=S.ErrorDetail(message=message, type=error_type, param=getattr(exc, "param", None), code=code)))
                    else:
                        result = f.result()
                        yield chunk(None if kind == "chat" else "", finish=result.finish_reason)
                        if include_usage:
                            yield chunk(usage=S.Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                                                      total_tokens=result.prompt_tokens + result.completion_tokens), empty=True)
                    yield "data: [DONE]\n\n"
                    return
                item = await queue.get()
        finally:
            job.cancel.set()  # the client left (or the stream ended): stop generating

    return EventStream(events(), job.cancel)


# ---------------------------------------------------------------- OpenAPI


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema, with the streamed event types, 400 (not 422) for invalid input, and the bearer scheme."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi
    from pydantic.json_schema import models_json_schema

    schema = get_openapi(title=app.title, version=app.version, summary=app.summary, description=app.description,
                         routes=app.routes, tags=app.openapi_tags)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    _, extra = models_json_schema([(S.ChatCompletionChunk, "serialization")], ref_template="#/components/schemas/{model}")
    for name, definition in extra.get("$defs", {}).items():
        components.setdefault(name, definition)
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    streamed = {"/v1/chat/completions": "ChatCompletionChunk", "/v1/completions": "Completion"}
    for path, operations in schema.get("paths", {}).items():
        for op in operations.values():
            responses = op.get("responses", {})
            if "422" in responses:
                del responses["422"]
                responses.setdefault("400", {"description": _ERRORS[400]["description"],
                                             "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}})
            if path in streamed:
                responses["200"]["content"]["text/event-stream"] = {
                    "schema": {"$ref": f"#/components/schemas/{streamed[path]}"},
                    "description": "With stream=true: `data: {...}` events, then `data: [DONE]`.",
                }
            if path.startswith(PROTECTED_PREFIXES):
                op["security"] = [{"bearer": []}, {}]
    schema["components"]["securitySchemes"] = {
        "bearer": {"type": "http", "scheme": "bearer", "description": "Only when the server runs with --api-key (or MONOSCOPE_API_KEY)."}
    }
    app.openapi_schema = schema
    return schema


def fastapi_app(app: Any) -> FastAPI:
    """The FastAPI application inside what `create_app` returned (it may be wrapped in the `Guard`)."""
    return app.app if isinstance(app, Guard) else app
