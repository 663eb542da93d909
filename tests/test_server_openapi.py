"""The HTTP contract: the committed openapi.json equals the schema the app generates from its pydantic models.

When this fails after an intended change, regenerate the contract and review its diff:

    python -m monoscope.server.openapi > src/monoscope/server/openapi.json
"""

from __future__ import annotations

import json

from monoscope.server.openapi import CONTRACT, render, schema

REGENERATE = "python -m monoscope.server.openapi > src/monoscope/server/openapi.json"


def _diff(committed: dict, generated: dict, path: str = "") -> list[str]:
    if isinstance(committed, dict) and isinstance(generated, dict):
        out = []
        for key in sorted(set(committed) | set(generated)):
            where = f"{path}/{key}"
            if key not in committed:
                out.append(f"added {where}")
            elif key not in generated:
                out.append(f"removed {where}")
            else:
                out.extend(_diff(committed[key], generated[key], where))
        return out
    return [] if committed == generated else [f"changed {path}"]


def test_committed_contract_matches_the_app():
    committed = json.loads(CONTRACT.read_text())
    generated = schema()
    differences = _diff(committed, generated)
    assert not differences, f"openapi.json is out of date ({'; '.join(differences[:10])}); run: {REGENERATE}"
    assert CONTRACT.read_text() == render(), f"openapi.json is not formatted as generated; run: {REGENERATE}"


def test_contract_covers_the_api():
    spec = json.loads(CONTRACT.read_text())
    paths = spec["paths"]
    for path in (
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/models",
        "/api/features/{feature_id}",
        "/api/search",
        "/api/search/examples",
        "/api/scan",
        "/api/map",
        "/api/features/{feature_id}/neighbours",
        "/api/attribute",
    ):
        assert path in paths, path
    chat = paths["/v1/chat/completions"]["post"]
    assert set(chat["responses"]) >= {"200", "400", "401", "404", "413", "503"} and "422" not in chat["responses"]
    assert "text/event-stream" in chat["responses"]["200"]["content"]
    request = spec["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert {"messages", "max_tokens", "temperature", "stream", "steering", "steering_strength"} <= set(request)
    item = spec["components"]["schemas"]["SteeringItem"]["properties"]
    assert {"feature", "mode", "value", "sae", "vector", "coefficient"} <= set(item)
    assert "bearer" in spec["components"]["securitySchemes"]


def test_every_route_is_in_the_contract():
    from fastapi.routing import APIRoute

    from monoscope.server import create_app, fastapi_app

    spec = json.loads(CONTRACT.read_text())
    app = fastapi_app(create_app(None))
    for route in app.routes:
        if isinstance(route, APIRoute) and route.include_in_schema:
            for method in route.methods:
                assert method.lower() in spec["paths"].get(route.path, {}), (
                    f"{method} {route.path} is missing from openapi.json"
                )
