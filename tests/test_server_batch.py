"""The server's batch over real HTTP on loopback: concurrent completions with different steering decode together
and each equals the same request alone; a row whose steering overflows fails alone with a 4xx; a full queue
answers 503 at once; clients that drop their streams free their rows, and the next requests still finish."""

from __future__ import annotations

import http.client
import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from server_client import http as request

pytest_plugins = ["server_fixtures"]

CHAT = "/v1/chat/completions"
MSG = [{"role": "user", "content": "The quick brown fox"}]
MAX_QUEUE = 4


@pytest.fixture(scope="module")
def batch_server(served_sae, tmp_path_factory):
    """Its own server: a small queue, and a vector so large that adding it overflows float32."""
    from monoscope.server import ServerThread, Service, create_app
    from monoscope.steer import SteeringVector

    folder = tmp_path_factory.mktemp("vectors")
    SteeringVector({"resid_post.0": torch.full((32,), 1e35)}, name="boom").save(folder / "boom.safetensors")
    torch.manual_seed(3)
    SteeringVector({"resid_post.0": torch.randn(32)}, name="push").save(folder / "push.safetensors")
    svc = Service.load(
        [str(served_sae)],
        vectors=[str(folder / "boom.safetensors"), str(folder / "push.safetensors")],
        max_tokens_limit=200,
        max_queue=MAX_QUEUE,
        max_batch=8,
    )
    with ServerThread(create_app(svc)) as srv:
        yield srv, svc
    svc.close()


def slowed(svc, seconds: float = 0.004):
    """Slow every forward pass a little, so that requests sent together surely overlap."""
    return svc.lm.model.register_forward_pre_hook(lambda *a: time.sleep(seconds))


def chat(steering=None, **kw):
    return {"messages": MSG, "max_tokens": 12, "temperature": 0, "ignore_eos": True, "steering": steering or [], **kw}


def content(reply):
    assert reply.status == 200, reply.body
    return reply.json()["choices"][0]["message"]["content"]


def test_concurrent_requests_with_their_own_steering_equal_each_alone(batch_server):
    srv, svc = batch_server
    bodies = [
        chat(),
        chat([{"feature": 3, "mode": "clamp", "value": "8x"}]),
        chat(
            [{"feature": 5, "mode": "add", "value": 40.0, "positions": "generated"}, {"feature": 9, "mode": "ablate"}]
        ),
        chat([{"vector": "push", "coefficient": 20}], steering_strength=0.5),
    ]
    alone = [content(request("POST", srv.url + CHAT, b)) for b in bodies]
    before = request("GET", srv.url + "/api/stats").json()
    hook = slowed(svc)
    try:
        with ThreadPoolExecutor(len(bodies)) as pool:
            together = [content(r) for r in pool.map(lambda b: request("POST", srv.url + CHAT, b), bodies)]
    finally:
        hook.remove()
    assert together == alone
    assert len(set(alone)) >= 3  # the specs really differ in effect
    stats = request("GET", srv.url + "/api/stats").json()
    assert stats["peak_batch"] >= 2 and stats["generations"] == before["generations"] + len(bodies)
    assert request("GET", srv.url + "/api/info").json()["limits"]["max_batch"] == 8


def test_an_overflowing_row_fails_alone(batch_server):
    srv, svc = batch_server
    good = chat([{"feature": 3, "mode": "clamp", "value": "8x"}])
    expected = content(request("POST", srv.url + CHAT, good))
    boom = chat([{"vector": "boom", "coefficient": 1e4}])
    hook = slowed(svc)
    try:
        with ThreadPoolExecutor(3) as pool:
            replies = list(pool.map(lambda b: request("POST", srv.url + CHAT, b), [good, boom, good]))
    finally:
        hook.remove()
    assert content(replies[0]) == content(replies[2]) == expected
    assert replies[1].status == 400 and replies[1].json()["error"]["code"] == "nonfinite_activations"
    assert "non-finite" in replies[1].message
    streamed = request("POST", srv.url + CHAT, {**boom, "stream": True})  # streamed: the error arrives as an event
    assert streamed.status in (200, 400)
    assert "nonfinite_activations" in streamed.body.decode()
    assert request("GET", srv.url + "/api/stats").json()["failed"] == 0


def open_stream(port: int, max_tokens: int = 200) -> http.client.HTTPConnection:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    body = json.dumps({"messages": MSG, "max_tokens": max_tokens, "temperature": 0, "stream": True, "ignore_eos": True})
    conn.request("POST", CHAT, body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    resp.readline()  # the first event: the row is in the batch
    conn._test_response = resp  # type: ignore[attr-defined]
    return conn


def test_full_queue_answers_503_and_dropped_streams_free_their_rows(batch_server):
    srv, svc = batch_server
    before = request("GET", srv.url + "/api/stats").json()
    hook = slowed(svc, 0.01)
    try:
        streams = [open_stream(srv.port) for _ in range(MAX_QUEUE)]
        busy = request("POST", srv.url + CHAT, chat())
        assert (
            busy.status == 503
            and busy.json()["error"]["code"] == "queue_full"
            and {k.lower(): v for k, v in busy.headers.items()}["retry-after"] == "1"
        )
        assert "busy" in busy.message
        assert request("GET", srv.url + "/api/features/1").status == 200  # the database never waits for the model
        for conn in streams:  # the clients go away mid-stream
            conn.sock.close()
            conn.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            stats = request("GET", srv.url + "/api/stats").json()
            if stats["cancelled"] >= before["cancelled"] + MAX_QUEUE and stats["queued"] == 0:
                break
            time.sleep(0.05)
    finally:
        hook.remove()
    assert stats["cancelled"] == before["cancelled"] + MAX_QUEUE and stats["queued"] == 0 and stats["running"] == 0
    assert stats["last_cancelled_tokens"] < 200
    with ThreadPoolExecutor(MAX_QUEUE) as pool:  # nothing hangs: a full set of new requests finishes
        replies = list(pool.map(lambda _: request("POST", srv.url + CHAT, chat(), timeout=60), range(MAX_QUEUE)))
    assert all(r.status == 200 and r.json()["usage"]["completion_tokens"] == 12 for r in replies)
