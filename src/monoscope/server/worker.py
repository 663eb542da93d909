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
from typing import TYPE_CHECKING, Callable, Literal, Optional, TypeVar, Union

from ..errors import MonoscopeError
from ..steer.batch import BatchEngine, Request, RowResult
from ..steer.runtime import ChatMessages, ContextLengthExceeded, SamplingParams, encode_prompt, fit_context
from .errors import ApiError, Cancelled

if TYPE_CHECKING:
    from ..model import LoadedModel
    from ..steer.steering import Steering

DEFAULT_MAX_BATCH = 16
T = TypeVar("T")

GenerationEvent = Union[
    tuple[Literal["start"], int], tuple[Literal["text"], str], tuple[Literal["end"], "Future[GenerationResult]"]
]
"""What a streamed completion hears: its prompt's length when it joins, each text delta, then its future."""


@dataclass
class GenerationJob:
    """One completion: the prompt (chat messages or raw text), settings, steering, and where its text goes."""

    messages: ChatMessages | None
    prompt: str | None
    max_tokens: int
    temperature: float
    top_p: float | None
    seed: int | None
    stops: list[str]
    steering: Steering | None
    ignore_eos: bool = False
    cancel: threading.Event = field(default_factory=threading.Event)
    on_event: Callable[[GenerationEvent], None] | None = None


@dataclass
class GenerationResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Literal["stop", "length"]


@dataclass
class ModelJob:
    """A model job other than a completion: `run` it on the model thread, or `refuse` it (shutting down)."""

    run: Callable[[], None]
    refuse: Callable[[BaseException], None]


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

    def __init__(
        self,
        lm: LoadedModel,
        *,
        max_queue: int = 64,
        max_batch: int = DEFAULT_MAX_BATCH,
        context_length: int | None = None,
        truncate_prompt: bool = False,
    ):
        self.lm = lm
        self.max_queue = int(max_queue)
        self.engine = BatchEngine(lm, max_batch=max_batch)
        self.context_length = self.engine.context_length if context_length is None else context_length
        self.truncate_prompt = truncate_prompt
        self.stats = Stats()
        self._cond = threading.Condition()
        self._jobs: collections.deque[ModelJob] = collections.deque()  # model jobs other than completions
        self._arrived: list[
            tuple[Future[GenerationResult], GenerationJob]
        ] = []  # completions not yet handed to the engine
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

    def submit(self, fn: Callable[..., T], *args: object) -> Future[T]:
        """Run `fn(*args)` on the model thread, between two decoding steps."""
        future: Future[T] = self._enter()

        def run() -> None:
            if not future.set_running_or_notify_cancel():
                return  # the client left while it waited
            try:
                result = fn(*args)
            except BaseException as err:  # noqa: BLE001 - handed to the request
                future.set_exception(err)
            else:
                future.set_result(result)

        def refuse(err: BaseException) -> None:
            if future.set_running_or_notify_cancel():
                future.set_exception(err)

        with self._cond:
            self._jobs.append(ModelJob(run, refuse))
            self._cond.notify()
        return future

    def generate(self, job: GenerationJob) -> Future[GenerationResult]:
        """Queue a completion; the future's result is a `GenerationResult` (or ApiError / Cancelled)."""
        future: Future[GenerationResult] = self._enter()
        with self._cond:
            self._arrived.append((future, job))
            self._cond.notify()
        return future

    def _enter(self) -> Future:  # type: ignore[type-arg] - the caller says what it will hold
        with self._cond:
            if self._closed:
                raise ApiError(503, "the server is shutting down", "shutting_down")
            if self._pending >= self.max_queue:
                raise ApiError(
                    503,
                    f"the model is busy ({self._pending} requests waiting or running); retry in a moment",
                    "queue_full",
                )
            self._pending += 1
        future: Future = Future()
        future.add_done_callback(self._leave)
        return future

    def _leave(self, _: Future[object]) -> None:
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
                job.run()
            if self.engine.has_work():
                try:
                    self.engine.step()
                except Exception as err:  # noqa: BLE001 - every row of the batch fails, the worker goes on
                    self._abort(err)
                self.stats.peak_batch = self.engine.peak_batch
        self._shut_down()

    def _admit(self, future: Future[GenerationResult], job: GenerationJob) -> None:
        """Check a completion and hand it to the engine; a bad one fails here, before it joins the batch."""
        if not future.set_running_or_notify_cancel():
            return
        if job.cancel.is_set():
            self.stats.cancelled += 1
            future.set_exception(Cancelled())
            return
        try:
            ids = self._prompt_ids(job)
            params = SamplingParams(
                max_new_tokens=job.max_tokens,
                temperature=job.temperature if job.temperature > 0 else 0.0,
                top_p=job.top_p,
                seed=job.seed,
                stop=tuple(job.stops),
                min_new_tokens=job.max_tokens if job.ignore_eos else 0,
            )
            emit = job.on_event
            on_text = None if emit is None else (lambda delta: emit(("text", delta)))
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
                try:
                    job.on_event(("start", len(ids)))
                except Exception:  # noqa: BLE001 - nobody listens any more: the row leaves at the next step
                    job.cancel.set()

    def _finished(self, future: Future[GenerationResult], prompt_tokens: int, result: RowResult) -> None:
        n = len(result.ids)
        if result.finish_reason == "cancelled":
            self.stats.cancelled += 1
            self.stats.last_cancelled_tokens = n
            future.set_exception(Cancelled())
        elif result.finish_reason == "error" and result.error_code == "nonfinite":
            future.set_exception(
                ApiError(400, result.error or "the activations became non-finite", "nonfinite_activations", "steering")
            )
        elif result.finish_reason == "error":
            self.stats.failed += 1
            future.set_exception(self._failure or RuntimeError(result.error or "the generation failed"))
        else:
            self.stats.generations += 1
            self.stats.tokens_generated += n
            future.set_result(
                GenerationResult(result.text, prompt_tokens, n, "stop" if result.finish_reason == "stop" else "length")
            )

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
        for job in jobs:
            job.refuse(stopped)
        self._failure = stopped
        self.engine.abort("the server is shutting down")

    def _prompt_ids(self, job: GenerationJob) -> list[int]:
        """The job's prompt as token ids that leave room for its max_tokens (or a 400 saying why not)."""
        param = "messages" if job.messages is not None else "prompt"
        if job.messages is None and not job.prompt:
            raise ApiError(400, "the prompt is empty; give some text to continue", "empty_prompt", "prompt")
        prompt = job.messages if job.messages is not None else job.prompt or ""
        try:
            ids = encode_prompt(self.lm.tokenizer, prompt, raw=job.messages is None)[0].tolist()
            return fit_context(ids, job.max_tokens, self.context_length, truncate=self.truncate_prompt)
        except ContextLengthExceeded as err:
            raise ApiError(400, str(err), "context_length_exceeded", param) from None
        except MonoscopeError as err:
            raise ApiError(400, str(err), "invalid_prompt", param) from None
