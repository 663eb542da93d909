"""The FastAPI application: OpenAI-compatible /v1, monoscope's /api, and the web UI at /.

`create_app(service)` puts a loaded `Service` in `app.state` and includes the routers (routers/), which reach
it through `routers.deps.get_service`; `create_app(None)` builds the same routes without a model (enough for
the OpenAPI schema). Every answer that is not 200 has the OpenAI error shape (errors.py).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.middleware.gzip import GZipMiddleware
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp

from .. import __version__
from . import schemas as S
from .errors import ERROR_RESPONSES, install_error_handlers
from .guard import PROTECTED_PREFIXES, Guard
from .routers import features, model, openai, server, ui
from .service import Service

DESCRIPTION = (
    "An OpenAI-compatible API (`/v1`) whose completions take a `steering` extension "
    '(`[{"feature": 123, "mode": "clamp", "value": "8x"}]`), monoscope\'s feature API (`/api`) and a web UI (`/`). '
    "When the server runs with an API key, /v1 and /api need `Authorization: Bearer KEY`."
)
TAGS = [
    {"name": "openai", "description": "OpenAI-compatible endpoints (with the steering extension)."},
    {"name": "features", "description": "The feature database: dashboards, search, map."},
    {"name": "model", "description": "Endpoints that run the model: scan, search by example, attribution."},
    {"name": "server", "description": "What is served, and how busy it is."},
]
STREAMED = {"/v1/chat/completions": "ChatCompletionChunk", "/v1/completions": "Completion"}


def create_app(service: Service | None, *, api_key: str | None = None, max_body: int | None = None) -> ASGIApp:
    """The ASGI application (the FastAPI app inside the `Guard`; `fastapi_app()` unwraps it)."""
    max_body = max_body or (service.max_body_bytes if service is not None else S.MAX_BODY_BYTES)
    app = FastAPI(
        docs_url=None,  # /docs is served from the package (the built-in pages load their scripts from a CDN)
        redoc_url=None,
        title="monoscope",
        version=__version__,
        summary="Browse and steer the sparse-autoencoder features of a language model.",
        description=DESCRIPTION,
        openapi_tags=TAGS,
    )
    app.state.service = service
    app.state.api_key = api_key
    app.add_middleware(GZipMiddleware, minimum_size=4096)  # event streams are never compressed
    install_error_handlers(app)
    for router in (openai.router, server.router, features.router, model.router, ui.router):
        app.include_router(router)
    app.mount("/static", StaticFiles(directory=ui.STATIC_DIR), name="static")
    app.openapi = lambda: openapi_schema(app)  # type: ignore[method-assign]
    return Guard(app, api_key, max_body)


def openapi_schema(app: FastAPI) -> dict[str, Any]:
    """FastAPI's schema, with the streamed event types, 400 (not 422) for invalid input, and the bearer scheme."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    from fastapi.openapi.utils import get_openapi
    from pydantic.json_schema import models_json_schema

    schema = get_openapi(
        title=app.title,
        version=app.version,
        summary=app.summary,
        description=app.description,
        routes=app.routes,
        tags=app.openapi_tags,
    )
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    _, extra = models_json_schema(
        [(S.ChatCompletionChunk, "serialization")], ref_template="#/components/schemas/{model}"
    )
    for name, definition in extra.get("$defs", {}).items():
        components.setdefault(name, definition)
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    for path, operations in schema.get("paths", {}).items():
        for op in operations.values():
            responses = op.get("responses", {})
            if "422" in responses:
                del responses["422"]
                responses.setdefault(
                    "400",
                    {
                        "description": ERROR_RESPONSES[400]["description"],
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
                    },
                )
            if path in STREAMED:
                responses["200"]["content"]["text/event-stream"] = {
                    "schema": {"$ref": f"#/components/schemas/{STREAMED[path]}"},
                    "description": "With stream=true: `data: {...}` events, then `data: [DONE]`.",
                }
            if path.startswith(PROTECTED_PREFIXES):
                op["security"] = [{"bearer": []}, {}]
    schema["components"]["securitySchemes"] = {
        "bearer": {
            "type": "http",
            "scheme": "bearer",
            "description": "Only when the server runs with --api-key (or MONOSCOPE_API_KEY).",
        }
    }
    app.openapi_schema = schema
    return schema


def fastapi_app(app: ASGIApp) -> FastAPI:
    """The FastAPI application inside what `create_app` returned (it may be wrapped in the `Guard`)."""
    inner = app.app if isinstance(app, Guard) else app
    assert isinstance(inner, FastAPI)
    return inner
