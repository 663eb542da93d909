"""Bad requests get a 4xx with a one-line message in the OpenAI error shape, never a 500 or a hang, and the
server keeps answering afterwards."""

from __future__ import annotations

import http.client
import json

import pytest

from server_client import http as request

pytest_plugins = ["server_fixtures"]

CHAT = "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]


def chat(**fields):
    return {"messages": MSG, "max_tokens": 2, **fields}


# (method, path, body (dict -> JSON, bytes -> raw), status, code or None, words in the message)
CASES = [
    ("POST", CHAT, b"{bad json", 400, "invalid_json", "not valid JSON"),
    ("POST", CHAT, b"[1, 2]", 400, None, "JSON object"),
    ("POST", CHAT, b"", 400, None, "JSON body"),
    ("POST", CHAT, b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', 400, "invalid_utf8", "UTF-8"),
    ("POST", CHAT, {"messages": []}, 400, None, "messages"),
    ("POST", CHAT, {"max_tokens": 3}, 400, None, "messages"),
    ("POST", CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, 400, None, "role"),
    ("POST", CHAT, chat(max_tokens=-5), 400, None, "max_tokens"),
    ("POST", CHAT, chat(max_tokens=0), 400, None, "max_tokens"),
    ("POST", CHAT, chat(max_tokens=5000), 400, "max_tokens_too_large", "limit of 200"),
    ("POST", CHAT, chat(max_tokens="many"), 400, None, "max_tokens"),
    ("POST", CHAT, chat(temperature=5), 400, None, "temperature"),
    ("POST", CHAT, chat(temperature=-1), 400, None, "temperature"),
    ("POST", CHAT, chat(top_p=0), 400, None, "top_p"),
    ("POST", CHAT, chat(n=2), 400, None, "n"),
    ("POST", CHAT, chat(model="gpt-4"), 404, "model_not_found", "does not exist"),
    ("POST", CHAT, chat(steering=[{"feature": 64, "value": 3}]), 400, "unknown_feature", "64 features"),
    ("POST", CHAT, chat(steering=[{"feature": 10**12, "value": 3}]), 400, "unknown_feature", "does not exist"),
    ("POST", CHAT, chat(steering=[{"feature": -1, "value": 3}]), 400, None, "feature"),
    ("POST", CHAT, chat(steering=[{"feature": 1.5, "value": 3}]), 400, None, "feature"),
    ("POST", CHAT, chat(steering=[{"feature": 1, "value": "lots"}]), 400, None, "8x"),
    ("POST", CHAT, chat(steering=[{"feature": 1, "value": 1e9}]), 400, None, "value"),
    ("POST", CHAT, chat(steering=[{"feature": 1, "value": "1e9x"}]), 400, None, "beyond"),
    (
        "POST",
        CHAT,
        b'{"messages": [{"role": "user", "content": "hi"}], "steering": [{"feature": 1, "value": NaN}]}',
        400,
        None,
        "finite",
    ),
    ("POST", CHAT, chat(steering=[{"feature": 1, "mode": "explode", "value": 3}]), 400, None, "mode"),
    ("POST", CHAT, chat(steering=[{"feature": 1, "vector": "v"}]), 400, None, "not both"),
    ("POST", CHAT, chat(steering=[{"value": 3}]), 400, None, "feature"),
    ("POST", CHAT, chat(steering=[{"vector": "happy"}]), 400, "unknown_vector", "--vector"),
    ("POST", CHAT, chat(steering=[{"feature": 1, "value": 3, "sae": "other"}]), 404, "unknown_sae", "serves"),
    ("POST", CHAT, chat(steering=[{"feature": 1, "value": 3}] * 65), 400, None, "steering"),
    ("POST", CHAT, chat(steering_strength=1e9), 400, None, "steering_strength"),
    ("POST", CHAT, chat(stop=["a", "b", "c", "d", "e"]), 400, None, "stop"),
    ("POST", CHAT, {"messages": [{"role": "user", "content": "x" * 40_000}]}, 400, None, "32000"),
    (
        "POST",
        CHAT,
        {"messages": [{"role": "user", "content": "word " * 300}], "max_tokens": 10},
        400,
        "context_length_exceeded",
        "context length",
    ),
    (
        "POST",
        CHAT,
        {"messages": [{"role": "user", "content": "word " * 300}], "max_tokens": 10, "stream": True},
        400,
        "context_length_exceeded",
        "context length",
    ),
    ("POST", CHAT, chat(stream=True, steering=[{"feature": 99, "value": 1}]), 400, "unknown_feature", "64 features"),
    ("POST", "/v1/completions", {"prompt": ["a", "b"]}, 400, None, "exactly one prompt"),
    ("POST", "/v1/completions", {"prompt": ""}, 400, "empty_prompt", "empty"),
    ("GET", "/api/features/64", None, 404, "unknown_feature", "64 features"),
    ("GET", "/api/features/-3", None, 400, None, "feature_id"),
    ("GET", "/api/features/abc", None, 400, None, "feature_id"),
    ("GET", "/api/features/1?sae=nope", None, 404, "unknown_sae", "serves"),
    ("GET", "/api/features?ids=1,x", None, 400, "invalid_feature_id", "whole number"),
    ("GET", "/api/features?ids=1,99", None, 400, "unknown_feature", "does not exist"),
    ("GET", "/api/features?limit=0", None, 400, None, "limit"),
    ("GET", "/api/search", None, 400, None, "q"),
    ("GET", "/api/search?q=%20%20", None, 400, "empty_query", "words"),
    ("GET", "/api/search?q=fox&mode=meaning", None, 400, "no_embeddings", "by words"),
    ("GET", "/api/search?q=fox&mode=psychic", None, 400, None, "mode"),
    ("POST", "/api/scan", {"text": ""}, 400, None, "text"),
    ("POST", "/api/scan", {"text": "   "}, 400, "empty_text", "empty"),
    ("POST", "/api/scan", {"text": "x" * 9000}, 400, None, "8000"),
    ("POST", "/api/scan", {"text": "hi", "top": 0}, 400, None, "top"),
    ("POST", "/api/search/examples", {"texts": []}, 400, None, "texts"),
    ("POST", "/api/attribute", {"prompt": "hi", "target": "", "metric": "logit"}, 400, None, "target"),
    ("POST", "/api/attribute", {"prompt": "hi", "target": " x", "metric": "vibes"}, 400, None, "metric"),
    ("GET", CHAT, None, 405, None, "not allowed"),
    ("GET", "/v2/anything", None, 404, "not_found", "/docs"),
]


@pytest.mark.parametrize(
    "method, path, body, status, code, words", CASES, ids=[f"{c[0]} {c[1]} {i}" for i, c in enumerate(CASES)]
)
def test_bad_request(server, method, path, body, status, code, words):
    raw = body if isinstance(body, bytes) else None
    reply = request(method, server.url + path, None if raw is not None else body, raw=raw)
    assert reply.status == status, reply.body
    error = reply.json()["error"]
    assert words in error["message"], error
    assert error["type"] and (code is None or error["code"] == code)
    assert "Traceback" not in error["message"] and len(error["message"]) < 400


def test_huge_bodies_are_refused(server):
    big = json.dumps({"messages": [{"role": "user", "content": "x" * 2_000_000}]}).encode()
    reply = request("POST", server.url + CHAT, raw=big)
    assert reply.status == 413 and "1,000,000 bytes" in reply.message
    # chunked, without a Content-Length: counted while it is read
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request(
        "POST",
        CHAT,
        body=(b"x" * 65536 for _ in range(40)),
        headers={"Content-Type": "application/json"},
        encode_chunked=True,
    )
    resp = conn.getresponse()
    assert resp.status == 413 and json.loads(resp.read())["error"]["code"] == "body_too_large"
    conn.close()
    # a lying Content-Length is refused before the body is read
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.putrequest("POST", CHAT)
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(50_000_000))
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413
    conn.close()


def test_server_still_answers(server):
    reply = request("POST", server.url + CHAT, {"messages": MSG, "max_tokens": 3, "temperature": 0})
    assert reply.status == 200 and reply.json()["usage"]["completion_tokens"] == 3
    assert request("GET", server.url + "/api/features/0").status == 200
    stats = request("GET", server.url + "/api/stats").json()
    assert stats["failed"] == 0 and stats["queued"] == 0
