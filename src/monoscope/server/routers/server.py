"""What is served, and how busy it is: /health, /api/info, /api/stats."""

from __future__ import annotations

from fastapi import APIRouter

from .. import schemas as S
from ..errors import error_responses
from .deps import AuthDep, ServiceDep

router = APIRouter(tags=["server"])


@router.get("/health", response_model=S.Health, summary="Liveness (never needs a key)")
def health() -> S.Health:
    return S.Health()


@router.get("/api/info", response_model=S.ServerInfo, responses=error_responses(401))
def info(service: ServiceDep, auth: AuthDep) -> S.ServerInfo:
    return service.info(auth=auth)


@router.get("/api/stats", response_model=S.ServerStats, responses=error_responses(401))
def stats(service: ServiceDep) -> S.ServerStats:
    return service.stats()
