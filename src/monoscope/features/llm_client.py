"""A small client for any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, llama.cpp, Ollama, ...).

Standard library only. It retries 429, 5xx, timeouts and connection errors with exponential backoff (and
honours `Retry-After`), bounds the requests in flight across all threads, and counts tokens, cost and time.
Everything that can go wrong with the endpoint (down, junk body, unknown model, rejected key, over budget)
ends in one-line `LLMError` (a `MonoscopeError`), never a traceback or a hang.

    client = LLMClient(base_url="http://localhost:8000/v1", model="Qwen/Qwen2.5-7B-Instruct")
    client.check()                                   # one quick request: reachable? model served?
    text = client.complete("Say hi", system="Be brief", max_tokens=20)
    answers = client.map(lambda p: client.complete(p), prompts)  # at most `concurrency` in flight

Settings not passed as arguments come from the environment, first match wins:

    base URL  MONOSCOPE_LLM_BASE_URL, OPENAI_BASE_URL   (https://api.openai.com/v1 when only a key is set)
    model     MONOSCOPE_LLM_MODEL, OPENAI_MODEL
    API key   MONOSCOPE_LLM_API_KEY, OPENAI_API_KEY     (optional: local servers need none)
"""

from __future__ import annotations

import ipaddress
import json
import os
import queue
import random
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import Future
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from http.client import HTTPException
from typing import Any, Callable, Iterable, Sequence, TypeVar

from ..errors import MonoscopeError

T = TypeVar("T")
R = TypeVar("R")

OPENAI_BASE_URL = "https://api.openai.com/v1"
ENV_BASE_URL = ("MONOSCOPE_LLM_BASE_URL", "OPENAI_BASE_URL")
ENV_MODEL = ("MONOSCOPE_LLM_MODEL", "OPENAI_MODEL")
ENV_API_KEY = ("MONOSCOPE_LLM_API_KEY", "OPENAI_API_KEY")
_RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504, 520, 521, 522, 523, 524, 529}
_MAX_ERROR_TEXT = 200


class LLMError(MonoscopeError):
    """The endpoint could not give a usable answer; `fatal` errors (down, junk, unknown model, bad key) stop a run."""

    def __init__(self, message: str, *, fatal: bool = True, status: int | None = None):
        super().__init__(message)
        self.fatal = fatal
        self.status = status


class BudgetExceeded(LLMError):
    """The client's `max_cost` is spent; no further requests are sent."""


def _env(names: Sequence[str]) -> str | None:
    for name in names:
        value = os.environ.get(name)
        if value:
            return value.strip()
    return None


def normalize_base_url(url: str) -> str:
    """`http://host:8000` -> `http://host:8000/v1`; a trailing `/chat/completions` or `/` is dropped."""
    url = url.strip()
    if "://" not in url:
        url = "http://" + url
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise MonoscopeError(f"LLM base URL {url!r} is not an http(s) URL; pass e.g. --base-url http://localhost:8000/v1")
    path = parsed.path.rstrip("/")
    for suffix in ("/chat/completions", "/completions", "/models"):
        if path.endswith(suffix):
            path = path[: -len(suffix)]
            break
    if not path:
        path = "/v1"
    return urllib.parse.urlunsplit((parsed.scheme, parsed.netloc, path, "", ""))


def _is_loopback(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _short(text: str, limit: int = _MAX_ERROR_TEXT) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class Usage:
    """Tokens, cost and time of some requests; add them with `+`."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    seconds: float = 0.0
    retries: int = 0
    estimated: int = 0  # requests whose response had no `usage`; their tokens are estimated at 4 characters a token

    def __add__(self, other: "Usage") -> "Usage":
        return Usage(*(getattr(self, f) + getattr(other, f) for f in _USAGE_FIELDS))

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict[str, Any]:
        return {f: (round(getattr(self, f), 6) if isinstance(getattr(self, f), float) else getattr(self, f)) for f in _USAGE_FIELDS}


_USAGE_FIELDS = ("requests", "prompt_tokens", "completion_tokens", "cost_usd", "seconds", "retries", "estimated")


@dataclass
class ChatResult:
    """One completion: its text (empty when the model returned none) and what it cost."""

    text: str
    finish_reason: str | None
    usage: Usage = field(default_factory=Usage)
    model: str | None = None


class LLMClient:
    """OpenAI-compatible chat completions with retries, bounded concurrency and usage accounting (thread-safe)."""

    def __init__(
        self,
        base_url: str | None = None,
        model: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 120.0,
        max_retries: int = 4,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        concurrency: int = 4,
        input_cost_per_m: float | None = None,
        output_cost_per_m: float | None = None,
        max_cost: float | None = None,
        extra_body: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ):
        api_key = api_key if api_key is not None else _env(ENV_API_KEY)
        base_url = base_url or _env(ENV_BASE_URL) or (OPENAI_BASE_URL if api_key else None)
        if not base_url:
            raise MonoscopeError(
                "no LLM endpoint: pass --base-url (e.g. http://localhost:8000/v1) or set MONOSCOPE_LLM_BASE_URL or OPENAI_BASE_URL"
            )
        if concurrency < 1:
            raise MonoscopeError(f"LLM concurrency must be at least 1, got {concurrency}")
        if timeout <= 0:
            raise MonoscopeError(f"LLM timeout must be positive, got {timeout}")
        if max_retries < 0:
            raise MonoscopeError(f"LLM retries cannot be negative, got {max_retries}")
        for name, value in (("input cost", input_cost_per_m), ("output cost", output_cost_per_m), ("max cost", max_cost)):
            if value is not None and value < 0:
                raise MonoscopeError(f"LLM {name} cannot be negative, got {value}")
        if max_cost is not None and input_cost_per_m is None and output_cost_per_m is None:
            raise MonoscopeError("a cost limit needs prices: pass --input-cost and --output-cost (USD per 1M tokens)")
        self.base_url = normalize_base_url(base_url)
        self.model = model or _env(ENV_MODEL)
        self.api_key = api_key or None
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.concurrency = int(concurrency)
        self.input_cost_per_m = input_cost_per_m
        self.output_cost_per_m = output_cost_per_m
        self.max_cost = max_cost
        self.extra_body = dict(extra_body or {})
        self.headers = dict(headers or {})
        self._slots = threading.BoundedSemaphore(self.concurrency)
        self._lock = threading.Lock()
        self._usage = Usage()
        self._started = time.monotonic()
        handlers: list[Any] = [urllib.request.ProxyHandler({})] if _is_loopback(self.base_url) else []
        self._opener = urllib.request.build_opener(*handlers)

    # ------------------------------------------------------------------ accounting

    @property
    def usage(self) -> Usage:
        """Totals over every request this client has made (a copy)."""
        with self._lock:
            return Usage(*(getattr(self._usage, f) for f in _USAGE_FIELDS))

    @property
    def cost(self) -> float:
        with self._lock:
            return self._usage.cost_usd

    @property
    def has_prices(self) -> bool:
        return self.input_cost_per_m is not None or self.output_cost_per_m is not None

    def price(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * (self.input_cost_per_m or 0.0) + completion_tokens * (self.output_cost_per_m or 0.0)) / 1e6

    def describe_usage(self) -> str:
        u = self.usage
        cost = f", ${u.cost_usd:.4f}" if self.has_prices else ""
        return f"{u.requests} requests, {u.prompt_tokens:,} in / {u.completion_tokens:,} out tokens{cost}"

    # ------------------------------------------------------------------ requests

    @property
    def label(self) -> str:
        return f"{self.model or '(default model)'} at {self.base_url}"

    def _request(self, method: str, path: str, body: dict[str, Any] | None, timeout: float) -> tuple[int, bytes, dict[str, str]]:
        """One HTTP exchange; returns (status, body, headers) for any HTTP status, raises OSError-likes otherwise."""
        url = self.base_url + path
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Accept": "application/json", "User-Agent": "monoscope", **self.headers}
        if data is not None:
            headers["Content-Type"] = "application/json"
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with self._opener.open(req, timeout=timeout) as resp:
                return resp.status, resp.read(), {k.lower(): v for k, v in resp.headers.items()}
        except urllib.error.HTTPError as err:
            try:
                payload = err.read()
            except Exception:  # noqa: BLE001 - a broken error body is still an HTTP error
                payload = b""
            return err.code, payload, {k.lower(): v for k, v in (err.headers or {}).items()}

    def _delay(self, attempt: int, headers: dict[str, str] | None = None) -> float:
        retry_after = (headers or {}).get("retry-after")
        if retry_after:
            try:
                return min(self.max_backoff, max(0.0, float(retry_after)))
            except ValueError:
                try:
                    return min(self.max_backoff, max(0.0, parsedate_to_datetime(retry_after).timestamp() - time.time()))
                except (TypeError, ValueError):
                    pass
        base = min(self.max_backoff, self.backoff * (2**attempt))
        return base * (0.75 + 0.5 * random.random())

    def _http_error(self, status: int, payload: bytes, what: str) -> LLMError:
        message = _error_message(payload)
        lowered = message.lower()
        if status in (401, 403):
            return LLMError(
                f"the LLM endpoint {self.base_url} rejected the API key (HTTP {status}: {_short(message) or 'no message'}); "
                f"set it with --api-key-env VAR or MONOSCOPE_LLM_API_KEY / OPENAI_API_KEY",
                status=status,
            )
        if status == 404 and "model" in lowered:
            return LLMError(
                f"the LLM endpoint {self.base_url} does not serve model {self.model!r} ({_short(message)}); "
                f"pass a served one with --model (GET {self.base_url}/models lists them)",
                status=status,
            )
        if status == 404:
            return LLMError(
                f"no {what} API at {self.base_url} (HTTP 404); check --base-url (OpenAI-compatible servers usually end in /v1)",
                status=status,
            )
        if status in _RETRY_STATUS:
            return LLMError(
                f"the LLM endpoint {self.base_url} kept failing (HTTP {status}: {_short(message) or 'no message'}) "
                f"after {self.max_retries + 1} attempts; try again later or lower --concurrency",
                status=status,
                fatal=False,
            )
        return LLMError(
            f"the LLM endpoint {self.base_url} rejected the request (HTTP {status}: {_short(message) or 'no message'})",
            status=status,
            fatal=status not in (400, 413, 422),  # a too-long prompt fails one feature, not the run
        )

    def _send(self, method: str, path: str, body: dict[str, Any] | None, *, timeout: float, retries: int, what: str) -> tuple[dict[str, Any], int]:
        """Retries transient failures; returns (parsed JSON object, retries used) or raises `LLMError`."""
        attempt = 0
        while True:
            try:
                status, payload, headers = self._request(method, path, body, timeout)
            except (socket.timeout, TimeoutError):
                failure: LLMError = LLMError(
                    f"the LLM endpoint {self.base_url} did not answer within {timeout:g} s ({attempt + 1} attempts); "
                    f"raise the timeout or lower --concurrency",
                    fatal=False,
                )
                headers = {}
            except (urllib.error.URLError, ConnectionError, HTTPException, OSError) as err:
                reason = getattr(err, "reason", err)
                if isinstance(reason, (socket.timeout, TimeoutError)):
                    failure = LLMError(f"the LLM endpoint {self.base_url} did not answer within {timeout:g} s; raise the timeout", fatal=False)
                else:
                    failure = LLMError(
                        f"cannot reach the LLM endpoint {self.base_url} ({_short(str(reason), 80) or type(err).__name__}) "
                        f"after {attempt + 1} attempt(s); start the server or fix --base-url / MONOSCOPE_LLM_BASE_URL"
                    )
                headers = {}
            else:
                if status == 200:
                    try:
                        parsed = json.loads(payload.decode("utf-8"))
                    except (UnicodeDecodeError, json.JSONDecodeError):
                        raise LLMError(
                            f"the LLM endpoint {self.base_url} answered {what} with something that is not JSON "
                            f"({_short(payload.decode('utf-8', 'replace'), 60)!r}); is --base-url an OpenAI-compatible API (usually ending in /v1)?"
                        ) from None
                    if not isinstance(parsed, dict):
                        raise LLMError(f"the LLM endpoint {self.base_url} answered {what} with JSON that is not an object; is it OpenAI-compatible?")
                    return parsed, attempt
                failure = self._http_error(status, payload, what)
                if status not in _RETRY_STATUS:
                    raise failure
            if attempt >= retries:
                raise failure
            time.sleep(self._delay(attempt, headers))
            attempt += 1

    def models(self, *, timeout: float | None = None) -> list[str] | None:
        """Model ids from GET /models, or None when the endpoint does not list them (no retries: fails fast)."""
        try:
            data, _ = self._send("GET", "/models", None, timeout=min(self.timeout, timeout or 10.0), retries=0, what="GET /models")
        except LLMError as err:
            if err.status is not None and err.status not in (401, 403):
                return None  # some servers have no /models; the first chat request will tell
            raise
        items = data.get("data")
        if not isinstance(items, list):
            return None
        return [str(m.get("id")) for m in items if isinstance(m, dict) and m.get("id") is not None]

    def check(self) -> list[str] | None:
        """Fail fast when the endpoint is down, rejects the key, or does not serve the model; fills in the model
        when the endpoint serves exactly one and none was chosen. Returns the served model ids when listed."""
        served = self.models()
        if served is None:
            if not self.model:
                raise MonoscopeError(f"no model chosen for {self.base_url}: pass --model or set MONOSCOPE_LLM_MODEL")
            return None
        if not self.model:
            if len(served) == 1:
                self.model = served[0]
                return served
            raise MonoscopeError(f"no model chosen for {self.base_url}: pass --model, one of {', '.join(served[:10]) or '(none listed)'}")
        if served and self.model not in served:
            listed = ", ".join(served[:10]) + (", ..." if len(served) > 10 else "")
            raise LLMError(f"the LLM endpoint {self.base_url} does not serve model {self.model!r}; it serves: {listed}")
        return served

    def chat(
        self,
        messages: Sequence[dict[str, str]],
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        **extra: Any,
    ) -> ChatResult:
        """One chat completion. Raises `LLMError` when no usable answer comes back; an empty reply is ''."""
        if not self.model:
            raise MonoscopeError("no LLM model chosen: pass --model or set MONOSCOPE_LLM_MODEL (or call check() first)")
        if self.max_cost is not None and self.cost >= self.max_cost:
            raise BudgetExceeded(f"the LLM cost limit of ${self.max_cost:g} is spent (${self.cost:.4f}); raise --max-cost to continue")
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [dict(m) for m in messages],
            "max_tokens": int(max_tokens),
            "temperature": float(temperature),
            **self.extra_body,
            **extra,
        }
        with self._slots:
            start = time.monotonic()
            data, retries = self._send("POST", "/chat/completions", body, timeout=self.timeout, retries=self.max_retries, what="chat completions")
            seconds = time.monotonic() - start
        if "error" in data and not data.get("choices"):
            raise LLMError(f"the LLM endpoint {self.base_url} returned an error: {_short(_error_message(json.dumps(data).encode()))}")
        choices = data.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise LLMError(f"the LLM endpoint {self.base_url} returned a response without choices; is it an OpenAI-compatible chat-completions API?")
        choice = choices[0]
        message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
        content = message.get("content")
        if content is None:
            content = choice.get("text", "")  # some servers answer in the completions shape
        if isinstance(content, list):  # content parts
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        text = content if isinstance(content, str) else str(content)
        usage = Usage(requests=1, seconds=seconds, retries=retries)
        reported = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        try:
            usage.prompt_tokens = int(reported["prompt_tokens"])
            usage.completion_tokens = int(reported.get("completion_tokens", 0))
        except (KeyError, TypeError, ValueError):
            usage.prompt_tokens = sum(len(str(m.get("content", ""))) for m in messages) // 4
            usage.completion_tokens = len(text) // 4
            usage.estimated = 1
        usage.cost_usd = self.price(usage.prompt_tokens, usage.completion_tokens)
        with self._lock:
            self._usage = self._usage + usage
        return ChatResult(text=text, finish_reason=choice.get("finish_reason"), usage=usage, model=data.get("model"))

    def complete(self, prompt: str, *, system: str | None = None, **kwargs: Any) -> str:
        """The text of one completion of a single user message (after an optional system message)."""
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return self.chat(messages, **kwargs).text

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        """`[fn(x) for x in items]` on `concurrency` threads, in order; the first exception is raised (and the
        items not started yet are dropped)."""
        items = list(items)
        if len(items) <= 1 or self.concurrency == 1:
            return [fn(x) for x in items]
        pool = DaemonPool(min(self.concurrency, len(items)))
        futures = [pool.submit(fn, x) for x in items]
        try:
            return [f.result() for f in futures]
        finally:
            for f in futures:
                f.cancel()
            pool.shutdown()


class DaemonPool:
    """A minimal thread pool of daemon threads: unlike `ThreadPoolExecutor`, Ctrl-C does not wait for the
    requests in flight (up to the timeout) before the program can exit."""

    def __init__(self, workers: int, name: str = "monoscope-llm"):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(max(1, workers))]
        for t in self._threads:
            t.start()

    def submit(self, fn: Callable[..., R], *args: Any, **kwargs: Any) -> "Future[R]":
        future: Future = Future()
        self._queue.put((future, fn, args, kwargs))
        return future

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            future, fn, args, kwargs = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as err:  # noqa: BLE001 - handed to whoever waits on the future
                future.set_exception(err)

    def shutdown(self) -> None:
        """Let the threads end once the queued work is done (or cancelled); does not wait."""
        for _ in self._threads:
            self._queue.put(None)


def _error_message(payload: bytes) -> str:
    """The human part of an (OpenAI-shaped or not) error body."""
    text = payload.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return text
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict):
            parts = [str(err.get(k)) for k in ("message", "code") if err.get(k)]
            return ": ".join(parts) if parts else json.dumps(err)
        return str(err)
    return text


def client_from_args(args: Any) -> LLMClient:
    """An `LLMClient` from the `monoscope explain` options (see `add_llm_args`)."""
    api_key = None
    if getattr(args, "api_key_env", None):
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            raise MonoscopeError(f"--api-key-env {args.api_key_env}: that environment variable is not set")
    return LLMClient(
        base_url=args.base_url,
        model=args.model,
        api_key=api_key,
        timeout=args.timeout,
        max_retries=args.retries,
        concurrency=args.concurrency,
        input_cost_per_m=args.input_cost,
        output_cost_per_m=args.output_cost,
        max_cost=args.max_cost,
    )


def add_llm_args(p: Any) -> None:
    """The endpoint options shared by commands that talk to an LLM."""
    p.add_argument("--base-url", default=None, help="OpenAI-compatible API base URL, e.g. http://localhost:8000/v1 (default: $MONOSCOPE_LLM_BASE_URL, $OPENAI_BASE_URL)")
    p.add_argument("--model", default=None, help="model name at that endpoint (default: $MONOSCOPE_LLM_MODEL, or the only model the endpoint serves)")
    p.add_argument("--api-key-env", default=None, metavar="VAR", help="environment variable holding the API key (default: $MONOSCOPE_LLM_API_KEY, $OPENAI_API_KEY)")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight at once (default: 4)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for one answer (default: 120)")
    p.add_argument("--retries", type=int, default=4, help="retries on 429/5xx/timeouts/connection errors, with backoff (default: 4)")
    p.add_argument("--input-cost", type=float, default=None, metavar="USD", help="price per 1M input tokens, for cost accounting")
    p.add_argument("--output-cost", type=float, default=None, metavar="USD", help="price per 1M output tokens, for cost accounting")
    p.add_argument("--max-cost", type=float, default=None, metavar="USD", help="stop sending requests once this much is spent (needs the prices)")
