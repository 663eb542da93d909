"""Routes that run the model (other than completions): search by example, scan, attribution, suggestions.
Each job waits its turn on the model thread; a client that leaves gives its place up."""

from __future__ import annotations

import threading

from fastapi import APIRouter, Request

from .. import schemas as S
from ..errors import ApiError, error_responses
from ..streaming import wait_for
from .deps import ServiceDep

router = APIRouter(tags=["model"], responses=error_responses(400, 401, 404, 413, 503))


@router.post(
    "/api/search/examples",
    response_model=S.ExampleSearchResponse,
    summary="Features that fire on example texts (more than on the corpus or on contrast texts)",
)
async def search_examples(
    body: S.ExampleSearchRequest, request: Request, service: ServiceDep
) -> S.ExampleSearchResponse:
    served = service.sae(body.sae)
    return await wait_for(service.submit(service.jobs.example_search, served, body), request, threading.Event())


@router.post("/api/scan", response_model=S.ScanResponse, summary="Which features fire on each token of a text")
async def scan(body: S.ScanRequest, request: Request, service: ServiceDep) -> S.ScanResponse:
    if not body.text.strip():
        raise ApiError(400, "the text to scan is empty", "empty_text", "text")
    served = service.sae(body.sae)
    return await wait_for(service.submit(service.jobs.scan, served, body), request, threading.Event())


@router.post(
    "/api/attribute",
    response_model=S.AttributionResponse,
    summary="Which features push the model toward the tokens of a completion",
)
async def attribute(body: S.AttributionRequest, request: Request, service: ServiceDep) -> S.AttributionResponse:
    served = service.sae(body.sae)
    return await wait_for(service.submit(service.jobs.attribution, served, body), request, threading.Event())


@router.post(
    "/api/suggest",
    response_model=S.SuggestResponse,
    summary="What steers the model toward a concept: features (or a learned vector) chosen by their effect on generated text",
)
async def suggest(body: S.SuggestRequest, request: Request, service: ServiceDep) -> S.SuggestResponse:
    served = service.sae(body.sae)
    return await wait_for(service.submit(service.jobs.suggest, served, body), request, threading.Event())
