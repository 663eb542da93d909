"""Print the HTTP contract (OpenAPI 3) of `monoscope serve`, generated from the pydantic schemas.

    python -m monoscope.server.openapi > src/monoscope/server/openapi.json

The committed `openapi.json` must equal this output (tests/test_server_openapi.py checks it): change the
schemas or routes, run the command above, and review the diff of the contract with the code.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

CONTRACT = Path(__file__).with_name("openapi.json")


def schema() -> dict[str, Any]:
    from .app import create_app, fastapi_app

    return fastapi_app(create_app(None)).openapi()


def render() -> str:
    return json.dumps(schema(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main() -> int:
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
