"""What the routes depend on: the `Service` that `create_app` put in `app.state` (503 when none is loaded)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from ..dashboards import FeatureViews
from ..errors import ApiError
from ..service import Service


def get_service(request: Request) -> Service:
    service: Service | None = request.app.state.service
    if service is None:
        raise ApiError(503, "no model is loaded", "no_model")
    return service


def get_features(service: Annotated[Service, Depends(get_service)]) -> FeatureViews:
    return service.features


def auth_required(request: Request) -> bool:
    return bool(request.app.state.api_key)


ServiceDep = Annotated[Service, Depends(get_service)]
FeaturesDep = Annotated[FeatureViews, Depends(get_features)]
AuthDep = Annotated[bool, Depends(auth_required)]
