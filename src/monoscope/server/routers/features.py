"""The feature database: feature lists and pages (dashboards), neighbours, families, search and the map."""

from __future__ import annotations

from typing import Optional

from fastapi import APIRouter, Query
from fastapi import Path as PathParam

from .. import schemas as S
from ..errors import ApiError, error_responses
from .deps import FeaturesDep, ServiceDep

router = APIRouter(tags=["features"], responses=error_responses(400, 401, 404))

FEATURE_ID = PathParam(..., ge=0, le=2**31)


@router.get(
    "/api/features", response_model=S.FeatureList, summary="Feature summaries: by ids, or a page of all features"
)
def features(
    service: ServiceDep,
    views: FeaturesDep,
    sae: Optional[str] = Query(None, max_length=200, description="SAE id (default: the first served)."),
    ids: Optional[str] = Query(
        None, max_length=20_000, description="Comma-separated feature ids, e.g. 3,17,42 (at most 1000)."
    ),
    offset: int = Query(0, ge=0, le=10_000_000),
    limit: int = Query(50, ge=1, le=1000),
    order: str = Query(
        "id",
        pattern="^(id|density|max_activation)$",
        description="id, density or max_activation (the last two descending).",
    ),
) -> S.FeatureList:
    return views.listing(service.sae(sae), ids, offset, limit, order)  # type: ignore[arg-type] - the pattern checked it


@router.get(
    "/api/features/{feature_id}",
    response_model=S.FeatureDashboard,
    summary="A feature's dashboard: label, examples, histogram, logit effects, neighbours",
)
def feature(
    service: ServiceDep,
    views: FeaturesDep,
    feature_id: int = FEATURE_ID,
    sae: Optional[str] = Query(None, max_length=200),
    n_top: int = Query(20, ge=1, le=100, description="Top examples to return."),
) -> S.FeatureDashboard:
    return views.dashboard(service.sae(sae), feature_id, n_top)


@router.get(
    "/api/features/{feature_id}/neighbours",
    response_model=S.NeighbourList,
    summary="Nearest features by decoder cosine",
)
def neighbours(
    service: ServiceDep,
    views: FeaturesDep,
    feature_id: int = FEATURE_ID,
    sae: Optional[str] = Query(None, max_length=200),
) -> S.NeighbourList:
    served = service.sae(sae)
    return S.NeighbourList(sae=served.id, feature=feature_id, neighbours=views.neighbours(served, feature_id))


@router.get(
    "/api/features/{feature_id}/family",
    response_model=S.FamilyResponse,
    summary="The feature's closest features in the other served SAEs of the same hook point (feature splitting)",
)
def family(
    service: ServiceDep,
    views: FeaturesDep,
    feature_id: int = FEATURE_ID,
    sae: Optional[str] = Query(None, max_length=200),
    top: int = Query(5, ge=1, le=50, description="Matches per SAE."),
) -> S.FamilyResponse:
    return views.family(service.sae(sae), feature_id, top)


@router.get(
    "/api/search",
    response_model=S.SearchResponse,
    summary="Search features by the words or the meaning of their labels",
)
def search(
    service: ServiceDep,
    views: FeaturesDep,
    q: str = Query(..., min_length=1, max_length=500, description="Words to look for."),
    mode: str = Query(
        "hybrid", pattern="^(hybrid|words|meaning)$", description="hybrid (words and meaning fused), words or meaning."
    ),
    sae: Optional[str] = Query(None, max_length=200),
    limit: int = Query(20, ge=1, le=200),
) -> S.SearchResponse:
    if not q.strip():
        raise ApiError(400, "give some words to search for", "empty_query", "q")
    return views.search(service.sae(sae), q, mode, limit)  # type: ignore[arg-type] - the pattern checked it


@router.get("/api/map", response_model=S.MapResponse, summary="2-D map coordinates of every feature")
def feature_map(
    service: ServiceDep, views: FeaturesDep, sae: Optional[str] = Query(None, max_length=200)
) -> S.MapResponse:
    return views.feature_map(service.sae(sae))
