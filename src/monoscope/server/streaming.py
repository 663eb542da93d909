"""Waiting for model jobs and streaming completions as server-sent events, both cancelled when the client
disconnects (its row leaves the batch at the next step)."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future
from typing import AsyncIterator, Protocol, TypeVar

import anyio
from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from starlette.types import Receive, Scope, Send

from .errors import Cancelled, error_event
from .worker import GenerationEvent, GenerationJob, GenerationResult, ModelWorker

T = TypeVar("T")
POLL_SECONDS = 0.25


class EventStream(StreamingResponse):
    """Server-sent events that set `cancel` as soon as the client disconnects."""

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str], cancel: threading.Event):
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.cancel = cancel

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async with anyio.create_task_group() as group:

            async def watch() -> None:
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        self.cancel.set()
                        group.cancel_scope.cancel()
                        return

            group.start_soon(watch)
            try:
                await self.stream_response(send)
            except OSError:
                self.cancel.set()
            finally:
                group.cancel_scope.cancel()


def sse(payload: BaseModel) -> str:
    return f"data: {payload.model_dump_json(exclude_none=False)}\n\n"


async def wait_for(fut: Future[T], request: Request, cancel: threading.Event) -> T:
    """The result of a model job; sets `cancel` (and gives up) when the client disconnects meanwhile."""
    wrapped = asyncio.wrap_future(fut)
    while True:
        done, _ = await asyncio.wait({wrapped}, timeout=POLL_SECONDS)
        if done:
            return wrapped.result()
        if await request.is_disconnected():
            cancel.set()
            fut.cancel()
            raise Cancelled()


class StreamFormat(Protocol):
    """How one kind of completion (chat or text) writes its events."""

    def opening(self) -> list[str]: ...

    def delta(self, text: str) -> str: ...

    def closing(self, result: GenerationResult) -> list[str]: ...


async def stream_completion(
    worker: ModelWorker, job: GenerationJob, request: Request, fmt: StreamFormat
) -> EventStream:
    """Queue `job` and answer with its text as events; errors found before the first token keep their status."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[GenerationEvent] = asyncio.Queue()

    def deliver(item: GenerationEvent) -> None:  # from the model thread
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (shutting down): nobody reads this stream any more
            job.cancel.set()

    job.on_event = deliver
    future = worker.generate(job)
    future.add_done_callback(lambda f: deliver(("end", f)))
    # Wait until the job starts (or fails) before answering: errors still get their own status code.
    while True:
        try:
            first = await asyncio.wait_for(queue.get(), timeout=POLL_SECONDS)
            break
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancel.set()
                future.cancel()
                raise Cancelled() from None
    if first[0] == "end":
        if future.cancelled():
            raise Cancelled()
        exc = future.exception()
        if exc is not None:
            raise exc

    async def events() -> AsyncIterator[str]:
        try:
            for event in fmt.opening():
                yield event
            item = first
            while item[0] != "end":
                if item[0] == "text":
                    yield fmt.delta(item[1])
                item = await queue.get()
            exc = None if future.cancelled() else future.exception()
            if future.cancelled() or isinstance(exc, Cancelled):
                return
            if exc is not None:
                yield sse(error_event(exc))
            else:
                for event in fmt.closing(future.result()):
                    yield event
            yield "data: [DONE]\n\n"
        finally:
            job.cancel.set()  # the client left (or the stream ended): stop generating

    return EventStream(events(), job.cancel)
