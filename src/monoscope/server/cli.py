"""`monoscope serve`: one process serving the model, its SAE(s) and feature databases over HTTP, with the web UI.

Argument parsing and printing only; `register(subparsers)` adds the command to the `monoscope` parser.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys

from ..argtypes import port, positive_int
from ..cli_common import Parsers, add_device_args, add_model_arg

API_KEY_ENV = "MONOSCOPE_API_KEY"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_serve(args: argparse.Namespace) -> int:
    from .app import create_app
    from .runner import bind
    from .service import Service

    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    if not _is_loopback(args.host) and not api_key:
        print(
            f"monoscope: warning: serving on {args.host} without an API key: anyone who can reach this machine can use the model "
            f"(pass --api-key or set {API_KEY_ENV})",
            file=sys.stderr,
        )
    bind(args.host, args.port).close()  # fail on a busy port before loading the model
    service = Service.load(
        args.sae or [],
        model=args.model,
        device=args.device,
        dtype=args.model_dtype,
        vectors=args.vector or [],
        served_name=args.name,
        max_tokens_limit=args.max_tokens_limit,
        max_queue=args.max_queue,
        max_batch=args.max_batch,
        ablate_direction=args.ablate_direction,
    )
    app = create_app(service, api_key=api_key)

    def ready(port: int) -> None:
        host = f"[{args.host}]" if ":" in args.host else args.host
        base = f"http://{host}:{port}"
        saes = [
            f"{s.id} ({s.hook}, {s.d_sae:,} features{'' if s.store is not None else ', no feature database'})"
            for s in service.saes.values()
        ]
        print(
            f"monoscope serve: {service.served_name} with SAE{'s' if len(saes) > 1 else ''} " + ", ".join(saes)
            if saes
            else f"monoscope serve: {service.served_name} without an SAE (the OpenAI-compatible API only; --sae DIR serves features)"
        )
        print(f"  web UI       {base}/")
        print(
            f"  OpenAI API   {base}/v1   (model {service.served_name!r}; steering: "
            'extra_body={"steering": [{"feature": 0, "mode": "clamp", "value": "8x"}]})'
        )
        print(f"  API docs     {base}/docs" + ("   (API key required: Authorization: Bearer KEY)" if api_key else ""))
        if service.ablated_direction:
            print(f"  ablated      {service.ablated_direction}, at every layer and position of every request")
        print("  Ctrl-C stops the server", flush=True)

    from .runner import serve_forever

    try:
        serve_forever(app, args.host, args.port, log_level=args.log_level, on_ready=ready)
    finally:
        service.close()
    return 0


def register(sub: Parsers) -> None:
    p = sub.add_parser(
        "serve",
        help="serve the model, its SAE(s) and feature databases: web UI + OpenAI-compatible API with steering",
        description="Start one process that serves the model the SAE reads, the SAE(s) and their feature databases: a web UI "
        "(feature pages, search, scanner, equalizer chat, map) at /, an OpenAI-compatible API at /v1 whose completions "
        "take a `steering` list, and monoscope's feature API at /api (docs at /docs).",
    )
    p.add_argument(
        "--sae",
        action="append",
        metavar="DIR",
        help="SAE folder (its features.db is served when present); repeat for several, NAME=DIR to name one "
        "(none: serve --model alone, the OpenAI-compatible API only)",
    )
    add_model_arg(p, None, "the model the SAE records")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=port, default=8000, help="port (default: 8000; 0 picks a free one)")
    p.add_argument(
        "--api-key",
        default=None,
        help=f"require `Authorization: Bearer KEY` on /v1 and /api (default: ${API_KEY_ENV}, else none)",
    )
    p.add_argument(
        "--vector",
        action="append",
        metavar="[NAME=]FILE",
        help="serve a steering vector (.safetensors from `monoscope vector make`); repeatable",
    )
    p.add_argument(
        "--ablate-direction",
        metavar="FILE[:HOOK]",
        default=None,
        help="serve the model with this direction (a vector from `monoscope vector make`) projected out of its residual stream "
        "at every layer (hooked directional ablation; exact for every family incl. Gemma 2/3 and OLMo 2)",
    )
    p.add_argument(
        "--name", default=None, help="model id in /v1/models (default: the model's name, or its folder name)"
    )
    p.add_argument(
        "--max-tokens-limit",
        type=positive_int,
        default=1024,
        help="largest max_tokens a request may ask for (default: 1024)",
    )
    p.add_argument(
        "--max-queue",
        type=positive_int,
        default=64,
        help="model requests that may wait or run at once before 503 (default: 64)",
    )
    p.add_argument(
        "--max-batch",
        type=positive_int,
        default=16,
        help="completions decoded together; more wait for a free row (default: 16; on a GPU 64-256, see docs/server.md)",
    )
    add_device_args(p)
    p.add_argument(
        "--log-level",
        default="warning",
        choices=["critical", "error", "warning", "info", "debug"],
        help="uvicorn's log level; info logs every request (default: warning)",
    )
    p.set_defaults(func=cmd_serve)
