"""Stage 6: serve a model, its SAEs and feature databases over HTTP, with a web UI.

    monoscope serve --sae runs/quickstart/sae           # UI at http://127.0.0.1:8000, OpenAI API at /v1

    from monoscope.server import Service, create_app, ServerThread
    service = Service.load(["runs/quickstart/sae"])
    with ServerThread(create_app(service)) as server:   # uvicorn on a background thread, a free port
        print(server.url)

Any OpenAI client can use the steered model: `client.chat.completions.create(..., extra_body={"steering":
[{"feature": 123, "mode": "clamp", "value": "8x"}]})`. See docs/server.md for the endpoints, the limits and
the UI; the HTTP contract is `openapi.json` beside this file.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the names below, for type checkers; at run time they are imported on first use
    from .app import create_app, fastapi_app
    from .errors import ApiError
    from .runner import ServerThread, serve_forever
    from .saes import ServedSAE
    from .service import Service
    from .worker import ModelWorker

_EXPORTS = {
    "Service": "service",
    "ServedSAE": "saes",
    "ApiError": "errors",
    "ModelWorker": "worker",
    "create_app": "app",
    "fastapi_app": "app",
    "ServerThread": "runner",
    "serve_forever": "runner",
}

__all__ = [
    "ApiError",
    "ModelWorker",
    "ServedSAE",
    "ServerThread",
    "Service",
    "create_app",
    "fastapi_app",
    "serve_forever",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'monoscope.server' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
