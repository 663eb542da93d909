"""LLM feature explanations and their scores, against real HTTP endpoints on loopback.

Three kinds of endpoint, all real `http.server`s started here:
- `monoscope serve`'s app (no SAE) around the tiny random Llama from conftest: a real model whose answers are
  junk, for the robustness paths (unreadable answers, fallbacks, parse-failure rates);
- a RULE-BASED TEST MODEL (`rule_based_reply` below, not a language model): an OpenAI-compatible endpoint
  that explains by naming the most common marked token and judges by keyword matching, so the happy path
  has known right answers;
- scripted faulty endpoints (500/429 then success, non-JSON bodies, no choices, slow) for the client.
"""

from __future__ import annotations

import json
import random
import re
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

import pytest

from monoscope.autointerp.cli import parse_feature_spec
from monoscope.autointerp.client import BudgetExceeded, LLMClient, LLMError, normalize_base_url
from monoscope.autointerp.config import ExplainConfig
from monoscope.autointerp.examples import Example, split_examples
from monoscope.autointerp.explainer import explain_examples, explainer_prompt, parse_explanation
from monoscope.autointerp.run import explain_feature, explain_features
from monoscope.autointerp.scorers import classification_metrics, parse_judgement, score_detection, score_fuzzing
from monoscope.errors import MonoscopeError

# ---------------------------------------------------------------- test endpoints


class Endpoint:
    """A real HTTP server on 127.0.0.1 whose answers come from `respond(method, path, body) -> (status, bytes, headers)`."""

    def __init__(self, respond: Callable[[str, str, dict | None], tuple[int, bytes, dict]]):
        self.requests: list[tuple[str, str, dict | None]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                with lock:
                    outer.requests.append((method, self.path, body))
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                try:
                    status, payload, headers = respond(method, self.path, body)
                finally:
                    with lock:
                        outer.in_flight -= 1
                self.send_response(status)
                for key, value in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self):  # noqa: N802
                self._handle("GET")

            def do_POST(self):  # noqa: N802
                self._handle("POST")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> "Endpoint":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def chat_bodies(self) -> list[dict]:
        return [body for method, path, body in self.requests if method == "POST" and path.endswith("/chat/completions")]


def completion(text: str, prompt_tokens: int = 100, completion_tokens: int = 10) -> bytes:
    return json.dumps(
        {
            "id": "x",
            "object": "chat.completion",
            "model": "rules",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }
    ).encode()


def models(*names: str) -> bytes:
    return json.dumps({"object": "list", "data": [{"id": n, "object": "model"} for n in names]}).encode()


def rule_based_reply(messages: list[dict]) -> str:
    """The RULE-BASED TEST MODEL (not a language model). Explainer prompts: names the most common marked token.
    Judge prompts: takes the quoted keyword of the explanation; detection says 1 when the excerpt contains it,
    fuzzing says 1 when a marked span contains it."""
    system, user = messages[0]["content"], messages[-1]["content"]
    if "[EXPLANATION]" in system:
        spans = Counter(s.strip() for s in re.findall(r"<<(.+?)>>", user))
        word = spans.most_common(1)[0][0] if spans else "nothing"
        return f'The marked tokens are mostly the same word.\n[EXPLANATION]: the word "{word}"'
    keyword = re.search(r'^Explanation: .*?"(.+?)"', user, re.M)
    word = keyword.group(1) if keyword else "\0"
    excerpts = re.findall(r"^Example \d+: (.*)$", user, re.M)
    if "marked at random" in system:
        verdicts = [int(any(word in span for span in re.findall(r"<<(.+?)>>", ex))) for ex in excerpts]
    else:
        verdicts = [int(word in ex) for ex in excerpts]
    return f"Here is my answer: {json.dumps(verdicts)}"


def rule_based_endpoint(name: str = "rules") -> Endpoint:
    def respond(method, path, body):
        if method == "GET" and path.endswith("/models"):
            return 200, models(name), {}
        if body.get("model") != name:
            return (
                404,
                json.dumps(
                    {"error": {"message": f"The model `{body.get('model')}` does not exist", "code": "model_not_found"}}
                ).encode(),
                {},
            )
        return 200, completion(rule_based_reply(body["messages"])), {}

    return Endpoint(respond)


# ---------------------------------------------------------------- a synthetic feature: fires on " Paris"

WORDS = " the a city river old new small market bridge train north south road house garden morning evening".split()


def sentence(rng: random.Random, n: int, with_keyword: bool, level: float) -> Example:
    tokens = [" " + rng.choice(WORDS) for _ in range(n)]
    acts = [0.0] * n
    if with_keyword:
        pos = rng.randrange(2, n)
        tokens[pos] = " Paris"
        acts[pos] = level
    tokens[0] = tokens[0].strip().capitalize()
    return Example(tokens, acts)


@dataclass
class StoredExample:  # what a feature store hands out
    tokens: list[str]
    activations: list[float]

    @property
    def text(self) -> str:
        return "".join(self.tokens)


def paris_feature(seed: int = 0) -> dict[str, list[Example]]:
    rng = random.Random(seed)
    top = [sentence(rng, 12, True, 10.0 - 0.3 * i) for i in range(16)]
    quantile = [sentence(rng, 12, True, 1.0 + 0.5 * i) for i in range(10)]
    rand = [sentence(rng, 12, False, 0.0) for i in range(14)]
    return {"top": top, "quantile": quantile, "random": rand}


class MemoryStore:
    """The FeatureStore calls `explain_features` makes (`examples`, `add_label`, `labels`), in memory."""

    def __init__(self, features: dict[int, dict[str, list[Example]]]):
        self.features = features
        self.saved: list[tuple] = []

    def examples(self, feature_id: int, kind: str):
        return [StoredExample(e.tokens, e.activations) for e in self.features.get(feature_id, {}).get(kind, [])]

    def add_label(self, feature_id, source, text, *, detection=None, fuzzing=None, embedding_score=None):
        self.saved.append((feature_id, source, text, detection, fuzzing, embedding_score))

    def labels(self, feature_id):
        return [{"source": s[1]} for s in self.saved if s[0] == feature_id]


@dataclass
class ServedModel:
    lm: object
    base_url: str


@contextmanager
def serve_model(lm, name: str, *, truncate_prompt: bool = False):
    """The real server app with the model alone (no SAE) on a free loopback port."""
    from monoscope.server import ServerThread, Service, create_app

    service = Service(lm, served_name=name, truncate_prompt=truncate_prompt)
    try:
        with ServerThread(create_app(service)) as server:
            yield ServedModel(lm, server.url + "/v1")
    finally:
        service.close()


@pytest.fixture(scope="module")
def tiny_server(tiny_llama_dir):
    from monoscope.model import load_model

    with serve_model(load_model(str(tiny_llama_dir)), "tiny-llama", truncate_prompt=True) as served:
        yield served


FAST = ExplainConfig(explain_max_tokens=16, judge_max_tokens=12)

# ---------------------------------------------------------------- happy path (rule-based test model)


def test_correct_explanation_scores_high_and_wrong_one_near_chance():
    feature = paris_feature()
    with rule_based_endpoint() as ep:
        client = LLMClient(ep.base_url, "rules", concurrency=2)
        label = explain_feature(client, feature["top"], feature["quantile"], feature["random"], feature_id=3)
        assert label.error is None and label.explanation == 'the word "Paris"' and label.strict
        assert label.source == "llm:rules"
        assert label.n_explain == 15 and label.n_held_out == 10 and label.n_non_activating == 10
        assert label.detection.accuracy == 1.0 and label.detection.f1 == 1.0 and label.detection.n == 20
        assert label.fuzzing.accuracy == 1.0 and label.fuzzing.f1 == 1.0 and label.fuzzing.n == 20
        assert label.detection.parse_failure_rate == 0 and label.fuzzing.parse_failure_rate == 0
        assert label.usage.requests == 1 + 4 + 4 and label.usage.prompt_tokens == 900

        split = split_examples(feature["top"], feature["quantile"], feature["random"], seed=1)
        wrong = 'the word "banana"'
        det = score_detection(client, wrong, split.activating, split.non_activating)
        fuzz = score_fuzzing(client, wrong, split.activating)
        assert det.accuracy == 0.5 and det.f1 == 0.0 and det.balanced_accuracy == 0.5
        assert fuzz.accuracy == 0.5 and fuzz.f1 == 0.0


def test_explainer_never_sees_the_scoring_examples():
    feature = paris_feature(seed=5)
    store = MemoryStore({7: feature})
    with rule_based_endpoint() as ep:
        client = LLMClient(ep.base_url, "rules", concurrency=1)
        (label,) = explain_features(store, [7], client, progress=False, embedding=False)
        bodies = ep.chat_bodies()
    explainer = [b for b in bodies if "[EXPLANATION]" in b["messages"][0]["content"]]
    judges = [b for b in bodies if "[EXPLANATION]" not in b["messages"][0]["content"]]
    assert len(explainer) == 1 and len(judges) == 8
    shown = explainer[0]["messages"][-1]["content"]
    scored = {m for b in judges for m in re.findall(r"^Example \d+: (.*)$", b["messages"][-1]["content"], re.M)}
    scored_plain = {s.replace("<<", "").replace(">>", "") for s in scored}
    assert len(scored_plain) == 20  # 10 held-out firing excerpts and 10 non-firing ones
    assert not any(text in shown.replace("<<", "").replace(">>", "") for text in scored_plain)
    assert label.ok and store.saved == [(7, "llm:rules", 'the word "Paris"', 1.0, 1.0, None)]


def test_explain_features_records_failures_and_goes_on():
    store = MemoryStore({0: paris_feature(0), 1: {"top": [], "quantile": [], "random": []}, 2: paris_feature(2)})
    seen = []
    with rule_based_endpoint() as ep:
        client = LLMClient(ep.base_url, "rules", concurrency=2)
        run = explain_features(store, [0, 1, 2], client, progress=False, embedding=False, on_result=seen.append)
        assert [r.feature_id for r in sorted(run, key=lambda r: r.feature_id)] == [0, 1, 2]
        dead = next(r for r in run if r.feature_id == 1)
        assert not dead.ok and "dead feature" in dead.error
        assert run.n_ok == 2 and run.n_dead == 1 and run.n_failed == 0 and run.stopped is None and len(seen) == 3
        assert sorted(s[0] for s in store.saved) == [0, 2] and run.usage.requests == 18
        # Running again without overwrite skips what this model already labelled.
        again = explain_features(store, [0, 1, 2], client, progress=False, embedding=False, overwrite=False)
        assert again.skipped == 2 and [r.feature_id for r in again] == [1]


def test_cost_limit_stops_the_run_and_keeps_what_it_has():
    store = MemoryStore({i: paris_feature(i) for i in range(4)})
    with rule_based_endpoint() as ep:
        # 9 requests of 100 input + 10 output tokens per feature at $1000/1M = $0.99 per feature.
        client = LLMClient(
            ep.base_url, "rules", concurrency=1, input_cost_per_m=1000, output_cost_per_m=1000, max_cost=1.5
        )
        run = explain_features(store, range(4), client, progress=False, embedding=False)
    assert run.stopped and "cost limit" in run.stopped
    assert 1 <= len(store.saved) <= 2 and client.cost >= 1.5 and run.usage.cost_usd == pytest.approx(client.cost)
    with pytest.raises(BudgetExceeded):
        client.complete("more?")


# ---------------------------------------------------------------- robustness (tiny random model: junk answers)


def test_junk_answers_from_a_real_model_fall_back_and_report_parse_failures(tiny_server):
    feature = paris_feature()
    client = LLMClient(tiny_server.base_url, "tiny-llama")
    label = explain_feature(client, feature["top"], feature["quantile"], feature["random"], config=FAST)
    # Either the junk yields a non-strict explanation (scored), or none at all (recorded, not raised).
    if label.explanation is None:
        assert label.error and "no explanation" in label.error
        return
    assert not label.strict and label.error is None
    for score in (label.detection, label.fuzzing):
        assert score.n == 20 and score.n_requests == 4
        assert score.parse_failure_rate == score.n_unparsed / score.n
        assert score.n_unparsed > 0 and score.predictions.count(None) == score.n_unparsed
        assert 0.0 <= score.accuracy <= 1 - score.parse_failure_rate  # unreadable answers count as wrong
    assert label.usage.requests == 9 and label.usage.completion_tokens > 0


def test_served_model_speaks_the_api(tiny_server):
    client = LLMClient(tiny_server.base_url, "tiny-llama")
    assert client.check() == ["tiny-llama"] and LLMClient(tiny_server.base_url).check() == ["tiny-llama"]
    reply = client.chat([{"role": "user", "content": "hi"}], max_tokens=5)
    assert (
        reply.usage.completion_tokens <= 5
        and reply.usage.prompt_tokens > 0
        and reply.finish_reason in ("length", "stop")
    )
    same = client.chat([{"role": "user", "content": "hi"}], max_tokens=5)
    assert same.text == reply.text  # temperature 0 is greedy
    with pytest.raises(LLMError, match="does not serve model 'gpt-5'"):
        LLMClient(tiny_server.base_url, "gpt-5").check()
    with pytest.raises(LLMError, match="does not serve model"):
        LLMClient(tiny_server.base_url, "gpt-5").chat([{"role": "user", "content": "hi"}])
    with serve_model(tiny_server.lm, "tiny-llama") as strict:
        with pytest.raises(LLMError, match="maximum context length is 256") as err:
            LLMClient(strict.base_url, "tiny-llama").complete("hello " * 300, max_tokens=5)
        assert not err.value.fatal  # a too-long prompt fails one feature, not the run


# ---------------------------------------------------------------- the client against faulty endpoints


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_endpoint_down_is_a_quick_clear_error():
    url = f"http://127.0.0.1:{closed_port()}/v1"
    start = time.monotonic()
    with pytest.raises(LLMError, match="cannot reach the LLM endpoint") as err:
        LLMClient(url, "m").check()
    assert err.value.fatal and time.monotonic() - start < 2
    start = time.monotonic()
    with pytest.raises(LLMError, match=r"after 3 attempt\(s\)"):
        LLMClient(url, "m", max_retries=2).complete("hi")
    assert time.monotonic() - start < 3
    with pytest.raises(MonoscopeError, match="cannot reach"):
        explain_features(MemoryStore({0: paris_feature()}), [0], LLMClient(url, "m"), progress=False)


def test_429_and_500_are_retried_then_succeed():
    answers = [(500, b'{"error": {"message": "overloaded"}}', {}), (429, b"slow down", {"Retry-After": "0.05"})]

    def respond(method, path, body):
        return answers.pop(0) if answers else (200, completion("fine"), {})

    with Endpoint(respond) as ep:
        client = LLMClient(ep.base_url, "m")
        reply = client.chat([{"role": "user", "content": "hi"}])
    assert reply.text == "fine" and reply.usage.retries == 2 and len(ep.requests) == 3
    assert client.usage.retries == 2 and client.usage.requests == 1


def test_persistent_5xx_gives_up_without_stopping_a_run():
    with Endpoint(lambda m, p, b: (503, b"busy", {})) as ep:
        with pytest.raises(LLMError, match="HTTP 503") as err:
            LLMClient(ep.base_url, "m", max_retries=1).complete("hi")
    assert not err.value.fatal and len(ep.requests) == 2


@pytest.mark.parametrize(
    "status, payload, message",
    [
        (200, b"<html>hello</html>", "not JSON"),
        (200, b'{"object": "chat.completion"}', "without choices"),
        (200, b'{"choices": []}', "without choices"),
        (200, b"[1, 2]", "not an object"),
        (401, b'{"error": {"message": "bad key"}}', "rejected the API key"),
        (404, b"not here", "no chat completions API"),
    ],
)
def test_junk_responses_are_one_line_errors(status, payload, message):
    with Endpoint(lambda m, p, b: (status, payload, {})) as ep:
        with pytest.raises(LLMError, match=message) as err:
            LLMClient(ep.base_url, "m").complete("hi")
    assert "\n" not in str(err.value) and err.value.fatal and len(ep.requests) == 1


def test_a_junk_endpoint_stops_a_run_with_one_error():
    def respond(method, path, body):
        return (404, b"", {}) if method == "GET" else (200, b"Bad Gateway", {})

    with Endpoint(respond) as ep:
        with pytest.raises(LLMError, match="not JSON"):
            explain_features(
                MemoryStore({0: paris_feature(), 1: paris_feature(1)}),
                [0, 1],
                LLMClient(ep.base_url, "m"),
                progress=False,
            )
        assert len(ep.chat_bodies()) <= 2


def test_concurrency_is_bounded():
    def respond(method, path, body):
        time.sleep(0.15)
        return 200, completion("ok"), {}

    with Endpoint(respond) as ep:
        client = LLMClient(ep.base_url, "m", concurrency=3)
        # More threads than slots: the client's own limit holds whoever calls it.
        with ThreadPoolExecutor(8) as pool:
            out = list(pool.map(lambda i: client.complete(f"q{i}"), range(12)))
        assert out == ["ok"] * 12 and ep.max_in_flight == 3
        assert client.map(lambda i: client.complete(str(i)), range(6)) == ["ok"] * 6 and ep.max_in_flight == 3


def test_settings_from_the_environment(monkeypatch):
    for var in (
        "MONOSCOPE_LLM_BASE_URL",
        "OPENAI_BASE_URL",
        "MONOSCOPE_LLM_MODEL",
        "OPENAI_MODEL",
        "MONOSCOPE_LLM_API_KEY",
        "OPENAI_API_KEY",
    ):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(MonoscopeError, match="no LLM endpoint"):
        LLMClient()
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    assert LLMClient().base_url == "https://api.openai.com/v1"
    monkeypatch.setenv("OPENAI_BASE_URL", "http://localhost:9/v1/")
    monkeypatch.setenv("MONOSCOPE_LLM_BASE_URL", "localhost:8000")
    monkeypatch.setenv("MONOSCOPE_LLM_MODEL", "m1")
    client = LLMClient()
    assert (client.base_url, client.model, client.api_key) == ("http://localhost:8000/v1", "m1", "sk-test")
    assert normalize_base_url("https://x.ai/api/v1/chat/completions") == "https://x.ai/api/v1"
    with pytest.raises(MonoscopeError, match="needs prices"):
        LLMClient("http://x/v1", max_cost=1.0)


# ---------------------------------------------------------------- parsing and splitting (plain data)


@pytest.mark.parametrize(
    "answer, expected",
    [
        ('Reasoning...\n[EXPLANATION]: the word "Paris".', ('the word "Paris"', True)),
        ("<think>hmm [EXPLANATION]: no</think>\n**Explanation:** city names in France", ("city names in France", True)),
        ("[EXPLANATION]:\n  - closing brackets in code", ("closing brackets in code", True)),
        ("Mentions of rivers", ("Mentions of rivers", False)),
        ("Some thoughts.\n\nDates written as numbers\n", ("Dates written as numbers", False)),
        ("", (None, False)),
        ("12 34 ::", (None, False)),
    ],
)
def test_parse_explanation(answer, expected):
    assert parse_explanation(answer) == expected


@pytest.mark.parametrize(
    "answer, n, expected",
    [
        ("[1, 0, 1]", 3, [1, 0, 1]),
        ("Answer: [true, false, true, true]", 4, [1, 0, 1, 1]),
        ('["yes", "no"]', 2, [1, 0]),
        ("Matching examples: [2, 5]", 5, [0, 1, 0, 0, 1]),
        ("[]", 3, [0, 0, 0]),
        ("Example 1: yes\nExample 2: no\nExample 3: Yes", 3, [1, 0, 1]),
        ("1 0 0 1", 4, [1, 0, 0, 1]),
        ("<think>[0, 0]</think> [1, 1]", 2, [1, 1]),
        ("[1, 0]", 3, None),  # too short for 0/1 values, and 0 is no excerpt number
        ("[1, 0, 2]", 3, None),
        ("I think so", 3, None),
        ("[a, b, c]", 3, None),
        ("", 2, None),
    ],
)
def test_parse_judgement(answer, n, expected):
    assert parse_judgement(answer, n) == expected


def test_metrics_count_unreadable_as_wrong():
    m = classification_metrics([1, 1, 0, 0], [1, None, 0, None])
    assert m["accuracy"] == 0.5 and m["precision"] == 0.5 and m["recall"] == 0.5 and m["f1"] == 0.5


def test_split_is_disjoint_and_prompt_marks_firing_tokens():
    feature = paris_feature(3)
    dup = feature["top"][0]
    split = split_examples(feature["top"], feature["quantile"] + [dup], feature["random"] + [dup], n_held_out=40)
    shown = {e.text for e in split.explain}
    assert len(split.explain) == 15 and not shown & {e.text for e in split.activating + split.non_activating}
    assert len(split.activating) == 11 and all(e.fires for e in split.activating)
    assert len(split.non_activating) == 10 and not any(e.fires for e in split.non_activating)
    assert split.explain[0].max_activation == 10.0
    small = split_examples(feature["top"][:6], [], feature["random"])
    assert (
        len(small.explain) == 3
        and len(small.activating) == 3
        and not {e.text for e in small.explain} & {e.text for e in small.activating}
    )
    prompt = explainer_prompt([Example(["a", " b", " c", "\n", " d"], [0, 2, 4, 0, 0])])[-1]["content"]
    assert "Example 1: a<< b c>>\\n d" in prompt and 'Activations: "b" 5, "c" 10' in prompt
    long = Example([f" t{i}" for i in range(200)], [0.0] * 150 + [3.0] + [0.0] * 49).window(64)
    assert len(long.tokens) == 64 and long.max_activation == 3.0 and long.activations.index(3.0) == 48


def test_feature_spec():
    assert parse_feature_spec("0-3,7,2") == [0, 1, 2, 3, 7]
    assert parse_feature_spec("all") == "all" and parse_feature_spec("top-density") == "top-density"
    with pytest.raises(MonoscopeError, match="does not exist"):
        parse_feature_spec("10-20", n_features=16)
    with pytest.raises(MonoscopeError):
        parse_feature_spec("a-b")


def test_explain_examples_needs_examples():
    with rule_based_endpoint() as ep:
        with pytest.raises(MonoscopeError, match="no firing examples"):
            explain_examples(LLMClient(ep.base_url, "rules"), [])


# ---------------------------------------------------------------- the embedded model, end to end


@pytest.mark.embedded
def test_embedded_model_explains_a_feature_end_to_end():
    from monoscope.model import EMBEDDED_MODEL, load_model

    lm = load_model(EMBEDDED_MODEL)
    feature = paris_feature()
    with serve_model(lm, EMBEDDED_MODEL) as server:
        client = LLMClient(server.base_url, EMBEDDED_MODEL)
        label = explain_feature(
            client,
            feature["top"][:4],
            [],
            [],
            score=False,
            config=ExplainConfig(n_top=4, n_quantile=0, explain_max_tokens=24, context=16),
        )
    assert label.error is None and label.explanation and len(label.explanation) <= 200
    assert label.usage.requests == 1 and label.usage.completion_tokens <= 24


# ---------------------------------------------------------------- `monoscope explain` on a real feature database


def build_feature_db(path, features: dict[int, dict[str, list[Example]]], d_sae: int):
    """A small feature database holding the given examples (what `monoscope analyze` would store). Columns this
    test does not know (added to the schema later) get 0 or NULL."""
    import numpy as np

    from monoscope.features.store import SCHEMA_VERSION, StoreBuilder

    vocab: dict[str, int] = {}
    tables: dict[str, list[dict]] = {"features": [], "examples": [], "contexts": [], "tokens": []}
    for fid in range(d_sae):
        kinds = features.get(fid, {})
        firing = [a for e in kinds.get("top", []) for a in e.activations if a > 0]
        tables["features"].append(
            {
                "id": fid,
                "n_active": len(firing),
                "n_contexts": len(kinds.get("top", [])),
                "density": len(firing) / 1000,
                "mean_activation": float(np.mean(firing)) if firing else None,
                "max_activation": max(firing, default=0.0),
            }
        )
        for kind, items in kinds.items():
            for rank, ex in enumerate(items):
                ids = [vocab.setdefault(t, len(vocab)) for t in ex.tokens]
                ctx = len(tables["contexts"])
                tables["contexts"].append({"id": ctx, "token_ids": np.array(ids, dtype="<u2").tobytes()})
                tables["examples"].append(
                    {
                        "feature_id": fid,
                        "kind": kind,
                        "rank": rank,
                        "bin": rank if kind == "quantile" else None,
                        "context": ctx,
                        "start": 0,
                        "length": len(ids),
                        "peak": int(np.argmax(ex.activations)),
                        "activation": ex.max_activation,
                        "activations": np.array(ex.activations, dtype="<f2").tobytes() if ex.fires else None,
                    }
                )
    tables["tokens"] = [{"id": i, "text": t} for t, i in vocab.items()]
    with StoreBuilder(path) as builder:
        builder.set_meta(
            {
                "schema_version": SCHEMA_VERSION,
                "d_sae": d_sae,
                "d_in": 8,
                "model": "tiny",
                "hook_point": "resid_post.1",
                "token_dtype": "<u2",
                "acts_dtype": "<f2",
                "tokens_analysed": 1000,
            }
        )
        for table, rows in tables.items():
            info = builder.conn.execute(
                f"PRAGMA table_info({table})"
            ).fetchall()  # (cid, name, type, notnull, default, pk)
            columns = [c[1] for c in info]
            fill = {c[1]: (0 if c[3] else None) for c in info}
            builder.insert(table, columns, [tuple(row.get(c, fill[c]) for c in columns) for row in rows])
        builder.finish()
    return path


def run_cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    import os

    full_env = {**os.environ, "MONOSCOPE_PROGRESS": "0", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "monoscope", *args], capture_output=True, text=True, timeout=timeout, env=full_env
    )


def test_explain_command_labels_a_feature_database(tmp_path):
    from monoscope.features.store import FeatureStore

    build_feature_db(tmp_path / "features.db", {1: paris_feature(1), 3: paris_feature(3)}, d_sae=4)
    with rule_based_endpoint() as ep:
        args = [
            "explain",
            "--sae",
            str(tmp_path),
            "--base-url",
            ep.base_url,
            "--model",
            "rules",
            "--features",
            "top-density",
            "--input-cost",
            "1",
            "--output-cost",
            "2",
            "--report",
            str(tmp_path / "report.jsonl"),
            "--json",
        ]
        result = run_cli(*args)
        assert result.returncode == 0, result.stderr
        summary = json.loads(result.stdout)
        assert summary["labelled"] == 2 and summary["failed"] == 0 and summary["source"] == "llm:rules"
        assert summary["detection_accuracy"] == 1.0 and summary["fuzzing_accuracy"] == 1.0
        assert 0.0 <= summary["embedding_score"] <= 1.0 and summary["parse_failure_rate"] == 0.0
        assert summary["usage"]["requests"] == 18 and summary["usage"]["cost_usd"] == pytest.approx(18 * 120e-6)
        report = [json.loads(line) for line in (tmp_path / "report.jsonl").read_text().splitlines()]
        assert [r["feature_id"] for r in report] == [1, 3] and report[0]["detection"]["n"] == 20
        # The same command again continues: everything is labelled already.
        again = run_cli(*args[:-3])
        assert (
            again.returncode == 0 and "2 already labelled by this model" in again.stdout and len(ep.chat_bodies()) == 18
        )
    with FeatureStore.for_sae(tmp_path) as store:
        (label,) = [lb for lb in store.labels(3) if lb.source == "llm:rules"]
        assert (
            label.text == 'the word "Paris"'
            and label.detection == 1.0
            and label.fuzzing == 1.0
            and label.embedding_score is not None
        )
        assert store.feature(3).label == 'the word "Paris"'


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--base-url", "http://127.0.0.1:{port}/v1", "--model", "m"], "cannot reach the LLM endpoint"),
        (["--base-url", "http://127.0.0.1:{port}/v1", "--model", "m", "--features", "9"], "feature 9 does not exist"),
        (["--base-url", "RULES", "--model", "gpt-5"], "does not serve model 'gpt-5'; it serves: rules"),
        (
            ["--base-url", "RULES", "--api-key-env", "NO_SUCH_VAR_XYZ"],
            "NO_SUCH_VAR_XYZ: that environment variable is not set",
        ),
        (["--base-url", "RULES", "--max-cost", "1"], "needs prices"),
    ],
)
def test_explain_command_errors_are_one_line(tmp_path, extra, message):
    build_feature_db(tmp_path / "features.db", {0: paris_feature(0)}, d_sae=2)
    with rule_based_endpoint() as ep:
        extra = [x.replace("{port}", str(closed_port())).replace("RULES", ep.base_url) for x in extra]
        result = run_cli("explain", "--sae", str(tmp_path), *extra, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("monoscope: error:") and message in lines[0]
