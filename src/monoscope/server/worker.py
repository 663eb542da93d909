"""The model worker, the server's generation service: one thread owns the model and runs every job that uses it.

Completions go to a continuous-batching engine (`monoscope.steer.batch.BatchEngine`): a request that arrives
while others decode joins the batch at the next step, with its own steering, sampling, seed, stop strings and
max_tokens, and streams its text as it is decided; a finished or cancelled one leaves. The other model jobs
(scan, search by example, attribution) run between two engine steps in the order they came, so steering
hooks never leak into them, while the feature-database endpoints keep answering from the web server's threads.

At most `max_queue` jobs wait or run; beyond that a request gets 503 at once. A request is checked (prompt
length, steering compiled against the model) before it joins the batch, so a bad one fails alone with a 4xx;
a row whose activations become non-finite ends with an error while the others go on. A client that goes away
sets its job's cancel flag: its row leaves at the next step, or is skipped if it was still waiting.
"""

from __future__ import annotations

import collections
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from ..errors import MonoscopeError
from ..steer.batch import BatchEngine, Request, RowResult, SamplingParams
from .errors import ApiError, Cancelled

DEFAULT_MAX_BATCH = 16


@dataclass
class GenerationJob:
    """One completion: the prompt (chat messages or raw text), settings, steering, and where its text goes."""

    messages: list[dict[str, str]] | None
    prompt: str | None
    max_tokens: int
    temperature: float
    top_p: float | None
    seed: int | None
    stops: list[str]
    steering: Any  # Steering or None
    ignore_eos: bool = False
    cancel: threading.Event = field(default_factory=threading.Event)
    on_event: Callable[[tuple], None] | None = None  # ("start", prompt_tokens) and ("text", delta)


@dataclass
class GenerationResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # stop | length


@dataclass
class Stats:
    generations: int = 0
    cancelled: int = 0
    failed: int = 0
    tokens_generated: int = 0
    last_cancelled_tokens: Optional[int] = None
    peak_batch: int = 0


class ModelWorker:
    """One thread: the batch engine's steps, and other model jobs between them; at most `max_queue` jobs in it."""

    def __init__(self, lm: Any, *, max_queue: int = 64, max_batch: int = DEFAULT_MAX_BATCH, context_length: int | None = None,
                 truncate_prompt: bool = False):
        self.lm = lm
        self.max_queue = int(max_queue)
        self.context_length, self.truncate_prompt = context_length, truncate_prompt
        self.engine = BatchEngine(lm, max_batch=max_batch)
        self.stats = Stats()
        self._cond = threading.Condition()
        self._jobs: collections.deque = collections.deque()  # (future, fn, args) of other model jobs
        self._arrived: list[tuple[Future, GenerationJob]] = []  # completions not yet handed to the engine
        self._pending = 0
        self._closed = False
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="monoscope-model", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        return self._pending

    @property
    def running(self) -> int:
        return self.engine.running

    @property
    def max_batch(self) -> int:
        return self.engine.max_batch

    # ---- submitting (any thread)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        """Run `fn(*args)` on the model thread, between two decoding steps."""
        future = self._enter()
        with self._cond:
            self._jobs.append((future, fn, args))
            self._cond.notify()
        return future

    def generate(self, job: GenerationJob) -> Future:
        """Queue a completion; the future's result is a `GenerationResult` (or ApiError / Cancelled)."""
        future = self._enter()
        with self._cond:
            self._arrived.append((future, job))
            self._cond.notify()
        return future

    def _enter(self) -> Future:
        with self._cond:
            if self._closed:
                raise ApiError(503, "the server is shutting down", "shutting_down")
            if self._pending >= self.max_queue:
                raise ApiError(503, f"the model is busy ({self._pending} requests waiting or running); retry in a moment", "queue_full")
            self._pending += 1
        future: Future = Future()
        future.add_done_callback(self._leave)
        return future

    def _leave(self, _: Future) -> None:
        with self._cond:
            self._pending -= 1

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    # ---- the model thread

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._closed or self._arrived or self._jobs or self.engine.has_work()):
                    self._cond.wait()
                if self._closed:
                    break
                arrived, self._arrived = self._arrived, []
                job = self._jobs.popleft() if self._jobs else None
            for future, generation in arrived:
                self._admit(future, generation)
            if job is not None:
                self._run(*job)
            if self.engine.has_work():
                try:
                    self.engine.step()
                except Exception as err:  # noqa: BLE001 - every row of the batch fails, the worker goes on
                    self._abort(err)
                self.stats.peak_batch = max(self.stats.peak_batch, self.engine.running)
        self._shut_down()

    def _run(self, future: Future, fn: Callable[..., Any], args: tuple) -> None:
        if not future.set_running_or_notify_cancel():
            return  # the client left while it waited
        try:
            result = fn(*args)
        except BaseException as err:  # noqa: BLE001 - handed to the request
            future.set_exception(err)
        else:
            future.set_result(result)

    def _admit(self, future: Future, job: GenerationJob) -> None:
        """Check a completion and hand it to the engine; a bad one fails here, before it joins the batch."""
        if not future.set_running_or_notify_cancel():
            return
        if job.cancel.is_set():
            self.stats.cancelled += 1
            future.set_exception(Cancelled())
            return
        try:
            ids = self._prompt_ids(job)
            params = SamplingParams(max_new_tokens=job.max_tokens, temperature=job.temperature if job.temperature > 0 else 0.0,
                                    top_p=job.top_p, seed=job.seed, stop=tuple(job.stops),
                                    min_new_tokens=job.max_tokens if job.ignore_eos else 0)
            on_text = None
            if job.on_event is not None:
                emit = job.on_event

                def on_text(delta: str) -> None:
                    emit(("text", delta))

            request = Request(ids, job.steering, params, on_text=on_text, cancel=job.cancel)
            self.engine.add(request, on_done=lambda result: self._finished(future, len(ids), result))
        except ApiError as err:
            future.set_exception(err)
        except MonoscopeError as err:
            future.set_exception(ApiError(400, str(err), "invalid_steering", "steering"))
        except Exception as err:  # noqa: BLE001
            self.stats.failed += 1
            future.set_exception(err)
        else:
            if job.on_event is not None:
                job.on_event(("start", len(ids)))

    def _finished(self, future: Future, prompt_tokens: int, result: RowResult) -> None:
        n = len(result.ids)
        if result.finish_reason == "cancelled":
            self.stats.cancelled += 1
            self.stats.last_cancelled_tokens = n
            future.set_exception(Cancelled())
        elif result.finish_reason == "error" and result.error_code == "nonfinite":
            future.set_exception(ApiError(400, result.error or "the activations became non-finite", "nonfinite_activations", "steering"))
        elif result.finish_reason == "error":
            self.stats.failed += 1
            future.set_exception(self._failure or RuntimeError(result.error or "the generation failed"))
        else:
            self.stats.generations += 1
            self.stats.tokens_generated += n
            future.set_result(GenerationResult(result.text, prompt_tokens, n, result.finish_reason))

    def _abort(self, err: BaseException) -> None:
        self._failure = err
        try:
            self.engine.abort(f"{type(err).__name__}: {err}")
        finally:
            self._failure = None

    def _shut_down(self) -> None:
        with self._cond:
            arrived, self._arrived = self._arrived, []
            jobs, self._jobs = list(self._jobs), collections.deque()
        stopped = ApiError(503, "the server is shutting down", "shutting_down")
        for future, _ in arrived:
            if future.set_running_or_notify_cancel():
                future.set_exception(stopped)
        for future, _, _ in jobs:
            if future.set_running_or_notify_cancel():
                future.set_exception(stopped)
        self._failure = stopped
        self.engine.abort("the server is shutting down")

    def _prompt_ids(self, job: GenerationJob) -> list[int]:
        from ..steer.generation import encode_prompt

        tok = self.lm.tokenizer
        param = "messages" if job.messages is not None else "prompt"
        if job.messages is None and not job.prompt:
            raise ApiError(400, "the prompt is empty; give some text to continue", "empty_prompt", "prompt")
        try:
            ids = encode_prompt(tok, job.messages) if job.messages is not None else encode_prompt(tok, job.prompt or "", raw=True)
        except MonoscopeError as err:
            raise ApiError(400, str(err), "invalid_prompt", param) from None
        n_prompt = int(ids.shape[-1])
        if self.context_length is not None and n_prompt + job.max_tokens > self.context_length:
            room = self.context_length - job.max_tokens
            if not self.truncate_prompt or room < 1:
                raise ApiError(400, f"This model's maximum context length is {self.context_length} tokens; the prompt has {n_prompt} "
                                    f"and max_tokens is {job.max_tokens}: shorten the prompt or lower max_tokens", "context_length_exceeded", param)
            ids = ids[:, -room:]
        return ids[0].tolist()
