"""A client for any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, llama.cpp, Ollama, `monoscope serve`).

The `openai` package does the HTTP: retries of 408/409/429/5xx, timeouts and connection errors with
exponential backoff (0.5 s doubling to 8 s, with jitter, or the server's `Retry-After` up to 2 minutes) and
parsing. What is monoscope's: a cost budget, a bound on the requests in flight across all threads, usage
accounting, and one-line `LLMError`s (a `MonoscopeError`) for everything that can go wrong with the endpoint.

    client = LLMClient(base_url="http://localhost:8000/v1", model="Qwen/Qwen2.5-7B-Instruct")
    client.check()                                   # one quick request: reachable? model served?
    text = client.complete("Say hi", system="Be brief", max_tokens=20)
    answers = client.map(lambda p: client.complete(p), prompts)  # at most `concurrency` in flight

Settings not passed as arguments come from the environment, first match wins: base URL
MONOSCOPE_LLM_BASE_URL, OPENAI_BASE_URL (https://api.openai.com/v1 when only a key is set); model
MONOSCOPE_LLM_MODEL, OPENAI_MODEL; API key MONOSCOPE_LLM_API_KEY, OPENAI_API_KEY (local servers need none).
"""

from __future__ import annotations

import ipaddress
import os
import threading
import time
import urllib.parse
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterable, Sequence, TypeVar, cast

import openai
from openai.types.chat import ChatCompletion, ChatCompletionMessageParam

from ..errors import MonoscopeError
from .pool import DaemonPool

T = TypeVar("T")
R = TypeVar("R")

OPENAI_BASE_URL = "https://api.openai.com/v1"
ENV_BASE_URL = ("MONOSCOPE_LLM_BASE_URL", "OPENAI_BASE_URL")
ENV_MODEL = ("MONOSCOPE_LLM_MODEL", "OPENAI_MODEL")
ENV_API_KEY = ("MONOSCOPE_LLM_API_KEY", "OPENAI_API_KEY")
NO_KEY = "EMPTY"  # sent when no key is set: the openai package needs one, local servers ignore it


class LLMError(MonoscopeError):
    """The endpoint gave no usable answer; `fatal` ones (down, junk, unknown model, bad key) stop a run."""

    def __init__(self, message: str, *, fatal: bool = True, status: int | None = None):
        super().__init__(message)
        self.fatal = fatal
        self.status = status


class BudgetExceeded(LLMError):
    """The client's `max_cost` is spent; no further requests are sent."""


@dataclass
class Usage:
    """Tokens, cost and time of some requests; add and subtract them with `+` and `-`."""

    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    seconds: float = 0.0
    retries: int = 0
    estimated: int = 0  # requests whose response had no `usage`; their tokens are estimated at 4 characters a token

    def __add__(self, other: Usage) -> Usage:
        return Usage(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def __sub__(self, other: Usage) -> Usage:
        return Usage(*(getattr(self, f.name) - getattr(other, f.name) for f in fields(self)))

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict[str, int | float]:
        return {f.name: round(v, 6) if isinstance(v := getattr(self, f.name), float) else v for f in fields(self)}


@dataclass
class ChatResult:
    """One completion: its text (empty when the model returned none) and what it cost."""

    text: str
    finish_reason: str | None
    usage: Usage = field(default_factory=Usage)
    model: str | None = None


def _env(names: Sequence[str]) -> str | None:
    return next((os.environ[n].strip() for n in names if os.environ.get(n)), None)


def normalize_base_url(url: str) -> str:
    """`http://host:8000` -> `http://host:8000/v1`; a trailing `/chat/completions` or `/` is dropped."""
    url = url.strip() if "://" in url else "http://" + url.strip()
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise MonoscopeError(
            f"LLM base URL {url!r} is not an http(s) URL; pass e.g. --base-url http://localhost:8000/v1"
        )
    path = parsed.path.rstrip("/")
    for suffix in ("/chat/completions", "/completions", "/models"):
        if path.endswith(suffix):
            path = path[: -len(suffix)]
            break
    return urllib.parse.urlunsplit((parsed.scheme, parsed.netloc, path or "/v1", "", ""))


def _is_loopback(url: str) -> bool:
    host = urllib.parse.urlsplit(url).hostname or ""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _short(text: object, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class LLMClient:
    """OpenAI-compatible chat completions with a cost budget, bounded concurrency and usage accounting (thread-safe)."""

    def __init__(
        self,
        base_url: str | None = None,
        model: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 120.0,
        max_retries: int = 4,
        concurrency: int = 4,
        input_cost_per_m: float | None = None,
        output_cost_per_m: float | None = None,
        max_cost: float | None = None,
        extra_body: dict[str, object] | None = None,
        headers: dict[str, str] | None = None,
    ):
        api_key = api_key if api_key is not None else _env(ENV_API_KEY)
        base_url = base_url or _env(ENV_BASE_URL) or (OPENAI_BASE_URL if api_key else None)
        if not base_url:
            raise MonoscopeError(
                "no LLM endpoint: pass --base-url (e.g. http://localhost:8000/v1) "
                "or set MONOSCOPE_LLM_BASE_URL or OPENAI_BASE_URL"
            )
        for name, value, least in (("concurrency", concurrency, 1), ("retries", max_retries, 0)):
            if value < least:
                raise MonoscopeError(f"LLM {name} must be at least {least}, got {value}")
        if timeout <= 0:
            raise MonoscopeError(f"LLM timeout must be positive, got {timeout}")
        for name, price in (
            ("input cost", input_cost_per_m),
            ("output cost", output_cost_per_m),
            ("max cost", max_cost),
        ):
            if price is not None and price < 0:
                raise MonoscopeError(f"LLM {name} cannot be negative, got {price}")
        if max_cost is not None and input_cost_per_m is None and output_cost_per_m is None:
            raise MonoscopeError("a cost limit needs prices: pass --input-cost and --output-cost (USD per 1M tokens)")
        self.base_url = normalize_base_url(base_url)
        self.model = model or _env(ENV_MODEL)
        self.api_key = api_key or None
        self.timeout, self.max_retries, self.concurrency = float(timeout), int(max_retries), int(concurrency)
        self.input_cost_per_m, self.output_cost_per_m, self.max_cost = input_cost_per_m, output_cost_per_m, max_cost
        self.extra_body = dict(extra_body or {})
        self._slots = threading.BoundedSemaphore(self.concurrency)
        self._lock = threading.Lock()
        self._usage = Usage()
        # A proxy from the environment would not reach a server on this machine.
        http = openai.DefaultHttpxClient(trust_env=False) if _is_loopback(self.base_url) else None
        self._openai = openai.OpenAI(
            base_url=self.base_url,
            api_key=self.api_key or NO_KEY,
            timeout=self.timeout,
            max_retries=self.max_retries,
            default_headers=headers,
            http_client=http,
        )

    # ------------------------------------------------------------------ accounting

    @property
    def usage(self) -> Usage:
        """Totals over every request this client has made (a copy)."""
        with self._lock:
            return self._usage + Usage()

    @property
    def cost(self) -> float:
        return self.usage.cost_usd

    @property
    def has_prices(self) -> bool:
        return self.input_cost_per_m is not None or self.output_cost_per_m is not None

    def price(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (
            prompt_tokens * (self.input_cost_per_m or 0.0) + completion_tokens * (self.output_cost_per_m or 0.0)
        ) / 1e6

    # ------------------------------------------------------------------ requests

    def models(self, *, timeout: float | None = None) -> list[str] | None:
        """Model ids from GET /models, or None when the endpoint does not list them (no retries: fails fast)."""
        quick = self._openai.with_options(max_retries=0, timeout=min(self.timeout, timeout or 10.0))
        try:
            page, _ = self._send(lambda: quick.models.with_raw_response.list(), attempts=1)
        except LLMError as err:
            if err.status is not None and err.status not in (401, 403):
                return None  # some servers have no /models; the first chat request will tell
            raise
        items = getattr(page, "data", None)
        if not isinstance(items, list):
            return None
        return [str(m.id) for m in items if getattr(m, "id", None) is not None]

    def check(self) -> list[str] | None:
        """Fail fast when the endpoint is down, rejects the key, or does not serve the model; fills in the model
        when the endpoint serves exactly one and none was chosen. Returns the served model ids when listed."""
        served = self.models()
        if served is not None and not self.model and len(served) == 1:
            self.model = served[0]
        if not self.model:
            listed = (
                f", one of {', '.join(served[:10]) or '(none listed)'}"
                if served is not None
                else " or set MONOSCOPE_LLM_MODEL"
            )
            raise MonoscopeError(f"no model chosen for {self.base_url}: pass --model{listed}")
        if served and self.model not in served:
            listed = ", ".join(served[:10]) + (", ..." if len(served) > 10 else "")
            raise LLMError(f"the LLM endpoint {self.base_url} does not serve model {self.model!r}; it serves: {listed}")
        return served

    def chat(
        self, messages: Sequence[dict[str, str]], *, max_tokens: int = 256, temperature: float = 0.0, **extra: object
    ) -> ChatResult:
        """One chat completion. Raises `LLMError` when no usable answer comes back; an empty reply is ''."""
        if not self.model:
            raise MonoscopeError("no LLM model chosen: pass --model or set MONOSCOPE_LLM_MODEL (or call check() first)")
        if self.max_cost is not None and self.cost >= self.max_cost:
            raise BudgetExceeded(
                f"the LLM cost limit of ${self.max_cost:g} is spent (${self.cost:.4f}); raise --max-cost to continue"
            )
        model, sent = self.model, cast(list[ChatCompletionMessageParam], [dict(m) for m in messages])
        with self._slots:
            start = time.monotonic()
            data, retries = self._send(
                lambda: self._openai.chat.completions.with_raw_response.create(
                    model=model,
                    messages=sent,
                    max_tokens=int(max_tokens),
                    temperature=float(temperature),
                    extra_body={**self.extra_body, **extra} or None,
                ),
                attempts=self.max_retries + 1,
            )
            usage = Usage(requests=1, seconds=time.monotonic() - start, retries=retries)
        if not isinstance(data, ChatCompletion) or not data.choices:
            raise LLMError(
                f"the LLM endpoint {self.base_url} returned a response without choices; "
                f"is it an OpenAI-compatible chat-completions API?"
            )
        choice = data.choices[0]
        text = getattr(choice.message, "content", None) or ""
        if data.usage is not None and data.usage.prompt_tokens is not None:
            usage.prompt_tokens, usage.completion_tokens = data.usage.prompt_tokens, data.usage.completion_tokens or 0
        else:
            usage.prompt_tokens = sum(len(str(m.get("content", ""))) for m in messages) // 4
            usage.completion_tokens, usage.estimated = len(text) // 4, 1
        usage.cost_usd = self.price(usage.prompt_tokens, usage.completion_tokens)
        with self._lock:
            self._usage = self._usage + usage
        return ChatResult(text=text, finish_reason=choice.finish_reason, usage=usage, model=data.model)

    def complete(
        self, prompt: str, *, system: str | None = None, max_tokens: int = 256, temperature: float = 0.0
    ) -> str:
        """The text of one completion of a single user message (after an optional system message)."""
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return self.chat(messages, max_tokens=max_tokens, temperature=temperature).text

    def map(self, fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
        """`[fn(x) for x in items]` on `concurrency` threads, in order; the first exception is raised (and the
        items not started yet are dropped)."""
        items = list(items)
        if len(items) <= 1 or self.concurrency == 1:
            return [fn(x) for x in items]
        with DaemonPool(min(self.concurrency, len(items))) as pool:
            return pool.map(fn, items)

    # ------------------------------------------------------------------ one-line errors

    def _send(self, send: Callable[[], Any], *, attempts: int) -> tuple[object, int]:
        """(parsed body, retries taken) of `send()`, an openai raw-response call; openai's errors and bodies that
        are not a JSON object become one-line `LLMError`s."""
        try:
            raw = send()
            parsed = raw.parse()
            if isinstance(parsed, str):
                raise ValueError(parsed)  # a body that is not JSON
            if not isinstance(parsed, openai.BaseModel):
                raise TypeError(type(parsed).__name__)  # JSON, but not an object
            return parsed, int(raw.retries_taken)
        except openai.APITimeoutError:
            raise LLMError(
                f"the LLM endpoint {self.base_url} did not answer within {self.timeout:g} s ({attempts} "
                f"attempt(s)); raise --timeout or lower --concurrency",
                fatal=False,
            ) from None
        except openai.APIConnectionError as err:
            reason = _short(err.__cause__ or err, 80)
            raise LLMError(
                f"cannot reach the LLM endpoint {self.base_url} ({reason}) after {attempts} attempt(s); "
                f"start the server or fix --base-url / MONOSCOPE_LLM_BASE_URL"
            ) from None
        except openai.APIStatusError as err:
            raise self._status_error(err, attempts) from None
        except ValueError:  # the body is not JSON
            raise LLMError(
                f"the LLM endpoint {self.base_url} answered with something that is not JSON; "
                f"is --base-url an OpenAI-compatible API (usually ending in /v1)?"
            ) from None
        except (TypeError, AttributeError):  # JSON, but not an object
            raise LLMError(
                f"the LLM endpoint {self.base_url} answered with JSON that is not an object; is it OpenAI-compatible?"
            ) from None

    def _status_error(self, err: openai.APIStatusError, attempts: int) -> LLMError:
        status, body = err.status_code, err.body
        message = (
            ": ".join(str(body[k]) for k in ("message", "code") if body.get(k)) if isinstance(body, dict) else body
        )
        detail = f"HTTP {status}: {_short(message or 'no message')}"
        if status in (401, 403):
            return LLMError(
                f"the LLM endpoint {self.base_url} rejected the API key ({detail}); set it with "
                f"--api-key-env VAR or MONOSCOPE_LLM_API_KEY / OPENAI_API_KEY",
                status=status,
            )
        if status == 404 and "model" in str(message).lower():
            return LLMError(
                f"the LLM endpoint {self.base_url} does not serve model {self.model!r} ({detail}); pass a "
                f"served one with --model (GET {self.base_url}/models lists them)",
                status=status,
            )
        if status == 404:
            return LLMError(
                f"no chat completions API at {self.base_url} (HTTP 404); check --base-url "
                f"(OpenAI-compatible servers usually end in /v1)",
                status=status,
            )
        if status in (408, 409, 429) or status >= 500:
            return LLMError(
                f"the LLM endpoint {self.base_url} kept failing ({detail}) after {attempts} attempt(s); "
                f"try again later or lower --concurrency",
                status=status,
                fatal=False,
            )
        # A too-long prompt (400/413/422) fails one feature, not the run.
        return LLMError(
            f"the LLM endpoint {self.base_url} rejected the request ({detail})",
            status=status,
            fatal=status not in (400, 413, 422),
        )
