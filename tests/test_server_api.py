"""`monoscope.server` over real HTTP: a uvicorn server on 127.0.0.1 serving the tiny Llama, a small TopK SAE
and its feature database (fixtures in server_fixtures.py), driven with urllib, http.client and the official
`openai` client."""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from server_client import http as request

pytest_plugins = ["server_fixtures"]

PROMPT = [{"role": "user", "content": "The quick brown fox"}]


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def strong_feature(server):
    """The feature with the largest max activation (steering it changes greedy output)."""
    r = request("GET", server.url + "/api/features?order=max_activation&limit=1").json()
    return r["features"][0]["id"]


def plain_generate(service, messages, max_new_tokens):
    from monoscope.steer.runtime import encode_prompt

    lm = service.lm
    ids = encode_prompt(lm.tokenizer, messages)
    with torch.inference_mode():
        out = lm.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=lm.tokenizer.pad_token_id,
        )
    return lm.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


# ---------------------------------------------------------------- OpenAI-compatible


def test_models_info_health(server, service):
    models = request("GET", server.url + "/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [service.served_name]
    info = request("GET", server.url + "/api/info").json()
    assert info["model"] == service.served_name and info["auth"] is False
    (sae,) = info["saes"]
    assert (sae["d_sae"], sae["d_in"], sae["hook_point"], sae["has_database"]) == (64, 32, "resid_post.0", True)
    assert info["limits"]["max_body_bytes"] == 1_000_000 and info["limits"]["max_tokens"] == 200
    assert request("GET", server.url + "/health").json() == {"status": "ok"}


def test_chat_equals_plain_generate_and_empty_steering(server, service):
    body = {"messages": PROMPT, "max_tokens": 12, "temperature": 0}
    plain = request("POST", server.url + "/v1/chat/completions", body).json()
    empty = request("POST", server.url + "/v1/chat/completions", {**body, "steering": []}).json()
    expected = plain_generate(service, PROMPT, 12)
    assert plain["choices"][0]["message"]["content"] == expected == empty["choices"][0]["message"]["content"]
    assert plain["object"] == "chat.completion" and plain["usage"]["completion_tokens"] == 12
    assert plain["choices"][0]["finish_reason"] == "length" and plain["steering"] is None


def test_openai_client_steering_changes_output(client, service, strong_feature):
    kw = dict(model=service.served_name, messages=PROMPT, max_tokens=12, temperature=0)
    plain = client.chat.completions.create(**kw).choices[0].message.content
    steering = [{"feature": strong_feature, "mode": "clamp", "value": "8x"}]
    steered = client.chat.completions.create(**kw, extra_body={"steering": steering})
    assert steered.choices[0].message.content != plain
    assert steered.model_extra["steering"]["edits"] == [f"{strong_feature}=clamp:8x"]
    empty = client.chat.completions.create(**kw, extra_body={"steering": []}).choices[0].message.content
    assert empty == plain
    # streamed, the same steering gives the same text, chunk by chunk
    chunks = list(
        client.chat.completions.create(
            **kw, stream=True, stream_options={"include_usage": True}, extra_body={"steering": steering}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == steered.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12 and not chunks[-1].choices
    # an absolute value, another mode, a strength of 0 (= no change)
    added = client.chat.completions.create(
        **kw, extra_body={"steering": [{"feature": strong_feature, "mode": "add", "value": 50.0}]}
    )
    assert added.choices[0].message.content != plain
    off = client.chat.completions.create(**kw, extra_body={"steering": steering, "steering_strength": 0.0})
    assert off.choices[0].message.content == plain


def test_completions_stream_and_not(client, service, server):
    kw = dict(model=service.served_name, prompt="def add(a, b):", max_tokens=8, temperature=0)
    whole = client.completions.create(**kw)
    assert whole.object == "text_completion" and whole.usage.completion_tokens == 8
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True) if c.choices)
    assert streamed == whole.choices[0].text
    # raw SSE framing
    raw = request(
        "POST",
        server.url + "/v1/completions",
        {"prompt": "def add(a, b):", "max_tokens": 4, "temperature": 0, "stream": True},
    )
    assert raw.status == 200 and raw.headers["content-type"].startswith("text/event-stream")
    events = [e for e in raw.body.decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "text_completion"


def test_seeded_sampling_and_stop(server):
    body = {"messages": PROMPT, "max_tokens": 10, "temperature": 1.0, "seed": 7}
    a = request("POST", server.url + "/v1/chat/completions", body).json()["choices"][0]["message"]["content"]
    b = request("POST", server.url + "/v1/chat/completions", body).json()["choices"][0]["message"]["content"]
    assert a == b
    greedy = request(
        "POST", server.url + "/v1/chat/completions", {"messages": PROMPT, "max_tokens": 12, "temperature": 0}
    ).json()
    text = greedy["choices"][0]["message"]["content"]
    stop = text[3:5] if len(text) >= 5 else None
    if stop:
        cut = request(
            "POST",
            server.url + "/v1/chat/completions",
            {"messages": PROMPT, "max_tokens": 12, "temperature": 0, "stop": [stop]},
        ).json()
        assert cut["choices"][0]["message"]["content"] == text[: text.find(stop)]
        assert cut["choices"][0]["finish_reason"] == "stop"


# ---------------------------------------------------------------- feature API


def test_feature_dashboard_and_lists(server, strong_feature):
    d = request("GET", f"{server.url}/api/features/{strong_feature}").json()
    f = d["feature"]
    assert f["id"] == strong_feature and f["label"] and f["max_activation"] > 0 and 0 < f["density"] <= 1
    assert d["top_examples"] and all(len(e["tokens"]) == len(e["activations"]) for e in d["top_examples"])
    top = d["top_examples"][0]
    assert (
        max(top["activations"]) == pytest.approx(top["max_activation"], rel=1e-2)
        and top["activations"][top["peak"]] > 0
    )
    assert (
        len(d["histogram"]["edges"]) == len(d["histogram"]["counts"]) + 1
        and sum(d["histogram"]["counts"]) == f["n_active"]
    )
    assert len(d["logits_up"]) == 10 and len(d["neighbours"]) == 10 and d["labels"][0]["source"] == "heuristic"
    near = request("GET", f"{server.url}/api/features/{strong_feature}/neighbours").json()["neighbours"]
    assert [n["id"] for n in near] == [n["id"] for n in d["neighbours"]]
    some = request("GET", server.url + "/api/features?ids=3,1,2").json()
    assert [x["id"] for x in some["features"]] == [3, 1, 2] and some["total"] == 64
    page = request("GET", server.url + "/api/features?offset=60&limit=10").json()
    assert [x["id"] for x in page["features"]] == [60, 61, 62, 63]
    m = request("GET", server.url + "/api/map").json()
    assert m["method"] == "pca" and len(m["ids"]) == len(m["x"]) == len(m["labels"]) == 64
    assert all(0 <= v <= 1 for v in m["x"] + m["y"])


def test_search_by_words_and_example(server, strong_feature):
    label = request("GET", f"{server.url}/api/features/{strong_feature}").json()["feature"]["label"]
    words = [w for w in re.findall(r"[A-Za-z]{2,}", label)]
    assert words, label
    r = request("GET", f"{server.url}/api/search?q={words[0]}&limit=64").json()
    assert r["mode"] == "words" and strong_feature in [
        h["id"] for h in r["hits"]
    ]  # hybrid falls back to words: no embeddings stored
    assert all(h["sparkline"] is not None and len(h["sparkline"]) <= 32 for h in r["hits"])
    ex = request(
        "POST",
        server.url + "/api/search/examples",
        {"texts": ["The quick brown fox jumps over the lazy dog."], "limit": 5},
    ).json()
    assert 1 <= len(ex["hits"]) <= 5 and all(h["example_mean"] > 0 for h in ex["hits"])


def test_scan_and_attribution(server):
    scan = request("POST", server.url + "/api/scan", {"text": "The quick brown fox", "top": 3}).json()
    assert "".join(t["token"] for t in scan["tokens"]) == "The quick brown fox"
    assert all(1 <= len(t["features"]) <= 3 for t in scan["tokens"]) and scan["top"]
    hit = scan["tokens"][0]["features"][0]
    assert hit["label"] and 0 < hit["fraction"]
    a = request(
        "POST",
        server.url + "/api/attribute",
        {"prompt": "The quick brown", "target": " fox jumps", "per_token": True, "top": 5},
    ).json()
    assert len(a["tokens"]) >= 2 and a["hook_point"] == "resid_post.0"
    assert a["tokens"][0]["features"] and all(f["label"] for f in a["tokens"][0]["features"])


def test_suggest_steering_toward_a_concept(server):
    reply = request(
        "POST",
        server.url + "/api/suggest",
        {"concept": "fox", "references": ["The quick brown fox jumps."], "method": "features"},
        timeout=300,
    )
    assert reply.status == 200, reply.body
    r = reply.json()
    assert (
        r["concept"] == "fox" and r["positions"] in ("generated", "all", "prompt") and r["hook_point"] == "resid_post.0"
    )
    if r[
        "works"
    ]:  # features to put in the equalizer as `add` edits, with their value as a multiple of the max activation
        assert r["kind"] in ("feature", "group", "contrast") and r["features"]
        assert r["similarity"] > r["unsteered_similarity"]
        assert (
            all(f["multiple"] is not None and f["multiple"] > 0 for f in r["features"]) and r["perplexity_ratio"] <= 3.0
        )
    else:
        assert not r["features"] and r["notes"]
    bad = request("POST", server.url + "/api/suggest", {"concept": "fox", "references": ["word " * 500]}, timeout=300)
    assert bad.status == 400 and "characters" in bad.json()["error"]["message"]


# ---------------------------------------------------------------- concurrency and cancellation


def test_concurrent_requests_are_queued_and_features_stay_responsive(server):
    body = {"messages": PROMPT, "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    with ThreadPoolExecutor(8) as pool:
        jobs = [pool.submit(request, "POST", server.url + "/v1/chat/completions", body) for _ in range(6)]
        time.sleep(0.05)
        t0 = time.perf_counter()
        dash = request("GET", server.url + "/api/features/1")
        feature_latency = time.perf_counter() - t0
        replies = [j.result() for j in jobs]
    assert dash.status == 200
    assert all(r.status == 200 for r in replies)
    texts = {r.json()["choices"][0]["message"]["content"] for r in replies}
    assert len(texts) == 1  # one model, one at a time: no request saw another's state
    assert feature_latency < 5.0


def test_disconnected_stream_stops_generating(server, service):
    """A client that closes a stream stops its generation (StoppingCriteria on a cancel flag)."""
    slow = service.lm.model.register_forward_pre_hook(lambda *a: time.sleep(0.01))
    try:
        before = request("GET", server.url + "/api/stats").json()
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        body = json.dumps({"messages": PROMPT, "max_tokens": 200, "temperature": 0, "stream": True, "ignore_eos": True})
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200
        resp.readline()  # the first event
        conn.sock.close()
        conn.close()
        deadline = time.monotonic() + 20
        while True:
            stats = request("GET", server.url + "/api/stats").json()
            if stats["cancelled"] > before["cancelled"] or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        slow.remove()
    assert stats["cancelled"] == before["cancelled"] + 1
    assert stats["last_cancelled_tokens"] < 150
    assert request("POST", server.url + "/v1/chat/completions", {"messages": PROMPT, "max_tokens": 2}).status == 200


# ---------------------------------------------------------------- clients and keys


def test_explain_client_accepts_the_server(server, service):
    from monoscope.autointerp.client import LLMClient

    assert LLMClient(base_url=server.url + "/v1", model=service.served_name).check() == [service.served_name]
    unnamed = LLMClient(base_url=server.url + "/v1")
    assert unnamed.check() == [service.served_name] and unnamed.model == service.served_name
    result = unnamed.chat([{"role": "user", "content": "Say hi"}], max_tokens=4)
    assert result.usage.completion_tokens == 4 and not result.usage.estimated


def test_api_key(service):
    from openai import AuthenticationError, OpenAI

    from monoscope.server import ServerThread, create_app

    with ServerThread(create_app(service, api_key="s3cret")) as keyed:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"}):
            r = request("GET", keyed.url + "/api/info", headers=headers)
            assert r.status == 401 and "API key" in r.message
            r = request("POST", keyed.url + "/v1/chat/completions", raw=b"{junk", headers=headers)
            assert r.status == 401
        assert (
            request("GET", keyed.url + "/api/info", headers={"Authorization": "Bearer s3cret"}).json()["auth"] is True
        )
        assert request("GET", keyed.url + "/health").status == 200 and request("GET", keyed.url + "/").status == 200
        with pytest.raises(AuthenticationError):
            OpenAI(base_url=keyed.url + "/v1", api_key="wrong", max_retries=0).models.list()
        ok = OpenAI(base_url=keyed.url + "/v1", api_key="s3cret", max_retries=0)
        assert (
            ok.chat.completions.create(
                model=service.served_name, messages=PROMPT, max_tokens=2, temperature=0
            ).usage.completion_tokens
            == 2
        )


def test_cli_serve(served_sae, tmp_path):
    """`monoscope serve` as a user runs it: a free port, the UI and API answer, Ctrl-C stops it; a busy port fails cleanly."""
    import signal

    from monoscope.steer import SteeringVector

    SteeringVector({"resid_post.0": torch.ones(32)}).save(tmp_path / "calm.safetensors")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "monoscope",
            "serve",
            "--sae",
            str(served_sae),
            "--port",
            "0",
            "--name",
            "tiny",
            "--vector",
            str(tmp_path / "calm.safetensors"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = None
        deadline = time.monotonic() + 60
        lines = []
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            match = re.search(r"web UI\s+(http://127\.0\.0\.1:\d+)/", line)
            url = match.group(1) if match else None
        assert url, "".join(lines) + proc.stderr.read()
        assert "<title>monoscope</title>" in request("GET", url + "/").body.decode()
        assert request("GET", url + "/v1/models").json()["data"][0]["id"] == "tiny"
        assert [v["id"] for v in request("GET", url + "/api/info").json()["vectors"]] == ["calm"]
        port = int(url.rsplit(":", 1)[1])
        busy = subprocess.run(
            [sys.executable, "-m", "monoscope", "serve", "--sae", str(served_sae), "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert busy.returncode == 2 and "cannot listen" in busy.stderr and "Traceback" not in busy.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert proc.returncode in (0, 130, -signal.SIGINT)


# ---------------------------------------------------------------- several SAEs, no database, vectors


@pytest.mark.filterwarnings("ignore:no feature database")
def test_several_saes_one_without_database_and_a_vector(served_sae, tmp_path):
    """Two SAEs of one model (one without a feature database: `8x` values are estimated) and a steering vector."""
    import shutil

    from monoscope.server import ServerThread, Service, create_app
    from monoscope.steer import SteeringVector

    bare = tmp_path / "bare"
    shutil.copytree(served_sae, bare, ignore=shutil.ignore_patterns("features.db"))
    torch.manual_seed(1)
    SteeringVector({"resid_post.0": torch.randn(32)}, name="push").save(tmp_path / "push.safetensors")
    svc = Service.load(
        [f"main={served_sae}", str(bare)], vectors=[f"push={tmp_path / 'push.safetensors'}"], max_tokens_limit=64
    )
    try:
        with ServerThread(create_app(svc)) as srv:
            info = request("GET", srv.url + "/api/info").json()
            assert [(s["id"], s["has_database"]) for s in info["saes"]] == [("main", True), ("bare", False)]
            assert info["vectors"] == [{"id": "push", "hook_points": ["resid_post.0"], "model": None}]
            assert request("GET", srv.url + "/api/features/3?sae=main").status == 200
            missing = request("GET", srv.url + "/api/features/3?sae=bare")
            assert missing.status == 404 and "monoscope analyze" in missing.message
            scan = request("POST", srv.url + "/api/scan", {"text": "The quick brown fox", "sae": "bare"}).json()
            assert scan["notes"] and scan["tokens"][0]["features"][0]["label"] is None
            base = {"messages": PROMPT, "max_tokens": 10, "temperature": 0}
            plain = request("POST", srv.url + "/v1/chat/completions", base).json()["choices"][0]["message"]["content"]
            for steering in (
                [{"feature": 5, "value": "8x", "sae": "bare"}],
                [{"feature": 5, "value": "8x", "sae": "main"}, {"feature": 9, "mode": "ablate", "sae": "bare"}],
                [{"vector": "push", "coefficient": 20}],
            ):
                reply = request("POST", srv.url + "/v1/chat/completions", {**base, "steering": steering})
                assert reply.status == 200, reply.body
                assert reply.json()["choices"][0]["message"]["content"] != plain, steering
    finally:
        svc.close()


# ---------------------------------------------------------------- the model alone (no SAE)


def test_model_alone_serves_the_openai_api_and_says_features_need_an_sae(tiny_llama_dir, tmp_path, capsys):
    """`monoscope serve --model M` without --sae: completions (plain and with a steering vector) work; every
    feature route and feature steering answer 404 `no_sae` saying how to serve one; neither flag is a clear error."""
    from monoscope.cli import main
    from monoscope.server import ServerThread, Service, create_app
    from monoscope.steer import SteeringVector

    torch.manual_seed(2)
    SteeringVector({"resid_post.0": torch.randn(32)}).save(tmp_path / "push.safetensors")
    svc = Service.load(
        [],
        model=str(tiny_llama_dir),
        served_name="tiny",
        vectors=[str(tmp_path / "push.safetensors")],
        max_tokens_limit=32,
    )
    try:
        with ServerThread(create_app(svc)) as srv:
            assert request("GET", srv.url + "/v1/models").json()["data"][0]["id"] == "tiny"
            info = request("GET", srv.url + "/api/info").json()
            assert info["saes"] == [] and info["vectors"][0]["id"] == "push"
            base = {"model": "tiny", "messages": PROMPT, "max_tokens": 8, "temperature": 0}
            plain = request("POST", srv.url + "/v1/chat/completions", base)
            assert plain.status == 200 and plain.json()["usage"]["completion_tokens"] > 0
            assert plain.json()["choices"][0]["message"]["content"] == plain_generate(
                svc, PROMPT, plain.json()["usage"]["completion_tokens"]
            )
            text = request(
                "POST", srv.url + "/v1/completions", {"prompt": "def add(a, b):", "max_tokens": 4, "temperature": 0}
            )
            assert text.status == 200 and text.json()["object"] == "text_completion"
            pushed = request(
                "POST", srv.url + "/v1/chat/completions", {**base, "steering": [{"vector": "push", "coefficient": 20}]}
            )
            assert (
                pushed.status == 200
                and pushed.json()["choices"][0]["message"]["content"]
                != plain.json()["choices"][0]["message"]["content"]
            )
            for method, path, body in (
                ("GET", "/api/features", None),
                ("GET", "/api/features/3", None),
                ("GET", "/api/map", None),
                ("GET", "/api/search?q=fox", None),
                ("POST", "/api/scan", {"text": "The quick brown fox"}),
                ("POST", "/api/attribute", {"prompt": "The quick", "target": " brown"}),
                ("POST", "/v1/chat/completions", {**base, "steering": [{"feature": 3, "value": 4}]}),
            ):
                r = request(method, srv.url + path, body)
                assert r.status == 404 and r.json()["error"]["code"] == "no_sae" and "--sae DIR" in r.message, (
                    path,
                    r.body,
                )
    finally:
        svc.close()
    assert main(["serve", "--port", "0"]) == 2
    assert "serve needs a model: pass --model NAME, or --sae DIR" in capsys.readouterr().err
