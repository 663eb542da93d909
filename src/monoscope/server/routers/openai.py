"""The OpenAI-compatible endpoints: /v1/models, /v1/chat/completions and /v1/completions (streaming with
stream=true), whose requests may carry monoscope's `steering` list.

Chat and text completions take one path (`complete`): they differ only in the prompt (messages through the
chat template, or raw text), the default max_tokens and the shape of the answer (`Answer`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal, Union

from fastapi import APIRouter, Request
from fastapi.responses import Response

from .. import schemas as S
from ..errors import error_responses
from ..service import Service, new_id
from ..streaming import sse, stream_completion, wait_for
from ..worker import GenerationJob, GenerationResult
from .deps import ServiceDep

router = APIRouter(tags=["openai"])

Kind = Literal["chat", "completion"]
CompletionBody = Union[S.ChatCompletionRequest, S.CompletionRequest]


@router.get("/v1/models", response_model=S.ModelList, responses=error_responses(401))
def list_models(service: ServiceDep) -> S.ModelList:
    return S.ModelList(data=[S.ModelCard(id=service.served_name, created=service.created)])


@router.post(
    "/v1/chat/completions",
    response_model=S.ChatCompletion,
    responses=error_responses(400, 401, 404, 413, 503),
    summary="Chat completion (streaming with stream=true), optionally steered",
)
async def chat_completions(
    body: S.ChatCompletionRequest, request: Request, service: ServiceDep
) -> Union[S.ChatCompletion, S.Completion, Response]:
    return await complete(service, body, request, "chat")


@router.post(
    "/v1/completions",
    response_model=S.Completion,
    responses=error_responses(400, 401, 404, 413, 503),
    summary="Text completion of a raw prompt (streaming with stream=true), optionally steered",
)
async def completions(
    body: S.CompletionRequest, request: Request, service: ServiceDep
) -> Union[S.ChatCompletion, S.Completion, Response]:
    return await complete(service, body, request, "completion")


async def complete(
    service: Service, body: CompletionBody, request: Request, kind: Kind
) -> Union[S.ChatCompletion, S.Completion, Response]:
    """Validate a completion request, queue it for the batch, and answer whole or as a stream."""
    service.check_model(body.model)
    steering, applied = service.steering(body.steering, body.steering_strength, body.steering_positions)
    if isinstance(body, S.ChatCompletionRequest):
        messages, prompt = [{"role": m.role, "content": m.text()} for m in body.messages], None
        max_tokens = body.max_completion_tokens or body.max_tokens
    else:
        messages, prompt, max_tokens = None, body.text(), body.max_tokens
    job = GenerationJob(
        messages=messages,
        prompt=prompt,
        max_tokens=service.max_tokens(max_tokens, kind),
        temperature=1.0 if body.temperature is None else float(body.temperature),
        top_p=body.top_p,
        seed=body.seed,
        stops=body.stops(),
        steering=steering,
        ignore_eos=body.ignore_eos,
    )
    answer = Answer(
        kind,
        new_id("chatcmpl" if kind == "chat" else "cmpl"),
        int(time.time()),
        service.served_name,
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
    )
    if body.stream:
        return await stream_completion(service.worker, job, request, answer)
    result = await wait_for(service.generate(job), request, job.cancel)
    return answer.whole(result, applied)


@dataclass
class Answer:
    """The shape of one completion's answer: the whole response, or its stream events."""

    kind: Kind
    id: str
    created: int
    model: str
    include_usage: bool = False

    def whole(
        self, result: GenerationResult, applied: S.SteeringApplied | None
    ) -> Union[S.ChatCompletion, S.Completion]:
        usage = _usage(result)
        if self.kind == "chat":
            return S.ChatCompletion(
                id=self.id,
                created=self.created,
                model=self.model,
                steering=applied,
                usage=usage,
                choices=[
                    S.ChatChoice(message=S.AssistantMessage(content=result.text), finish_reason=result.finish_reason)
                ],
            )
        return S.Completion(
            id=self.id,
            created=self.created,
            model=self.model,
            steering=applied,
            usage=usage,
            choices=[S.CompletionChoice(text=result.text, finish_reason=result.finish_reason)],
        )

    def opening(self) -> list[str]:
        return [self._chunk("", role=True)] if self.kind == "chat" else []

    def delta(self, text: str) -> str:
        return self._chunk(text)

    def closing(self, result: GenerationResult) -> list[str]:
        events = [self._chunk(None if self.kind == "chat" else "", finish=result.finish_reason)]
        if self.include_usage:
            events.append(self._chunk(usage=_usage(result), empty=True))
        return events

    def _chunk(
        self,
        delta: str | None = None,
        finish: Literal["stop", "length"] | None = None,
        role: bool = False,
        usage: S.Usage | None = None,
        empty: bool = False,
    ) -> str:
        if self.kind == "chat":
            chat_choices = (
                []
                if empty
                else [
                    S.ChatChunkChoice(
                        delta=S.ChatDelta(role="assistant" if role else None, content=delta), finish_reason=finish
                    )
                ]
            )
            return sse(
                S.ChatCompletionChunk(
                    id=self.id, created=self.created, model=self.model, choices=chat_choices, usage=usage
                )
            )
        text_choices = [] if empty else [S.CompletionChoice(text=delta or "", finish_reason=finish)]
        return sse(S.Completion(id=self.id, created=self.created, model=self.model, choices=text_choices, usage=usage))


def _usage(result: GenerationResult) -> S.Usage:
    return S.Usage(
        prompt_tokens=result.prompt_tokens,
        completion_tokens=result.completion_tokens,
        total_tokens=result.prompt_tokens + result.completion_tokens,
    )
