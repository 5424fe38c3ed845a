from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Response

from app.auth import CallerDep, SessionDep
from app.db.tables import WebhookEndpoint
from app.webhooks import service
from app.webhooks.schemas import (
    DeliveryList,
    DeliveryOut,
    EndpointCreate,
    EndpointList,
    EndpointOut,
)

router = APIRouter(prefix="/v1/webhook-endpoints", tags=["webhooks"])


def endpoint_of_project(
    endpoint_id: str, caller: CallerDep, session: SessionDep
) -> WebhookEndpoint:
    """Ownership as a dependency: another project's endpoint is a 404 before the route runs."""
    return service.get_endpoint(
        session=session, project_id=caller.project_id, endpoint_id=endpoint_id
    )


EndpointDep = Annotated[WebhookEndpoint, Depends(endpoint_of_project)]


@router.post("", status_code=201, response_model=EndpointOut)
def create_endpoint(spec: EndpointCreate, caller: CallerDep, session: SessionDep) -> EndpointOut:
    """The signing secret is in this response's `secret`, and never shown again."""
    endpoint = service.create_endpoint(session=session, project_id=caller.project_id, spec=spec)
    return service.to_out(endpoint, with_secret=True)


@router.get("", response_model=EndpointList)
def list_endpoints(
    caller: CallerDep,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: str | None = None,
) -> EndpointList:
    rows, has_more = service.list_endpoints(
        session=session, project_id=caller.project_id, limit=limit, after=after
    )
    return EndpointList(data=[service.to_out(row) for row in rows], has_more=has_more)


@router.get("/{endpoint_id}", response_model=EndpointOut)
def get_endpoint(endpoint: EndpointDep) -> EndpointOut:
    return service.to_out(endpoint)


@router.delete("/{endpoint_id}", status_code=204)
def delete_endpoint(endpoint: EndpointDep, session: SessionDep) -> Response:
    service.delete_endpoint(session=session, endpoint=endpoint)
    return Response(status_code=204)


@router.post("/{endpoint_id}/rotate-secret", response_model=EndpointOut)
def rotate_secret(endpoint: EndpointDep, session: SessionDep) -> EndpointOut:
    return service.to_out(
        service.rotate_secret(session=session, endpoint=endpoint), with_secret=True
    )


@router.get("/{endpoint_id}/deliveries", response_model=DeliveryList)
def list_deliveries(
    endpoint: EndpointDep,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: str | None = None,
) -> DeliveryList:
    rows, has_more = service.list_deliveries(
        session=session, endpoint=endpoint, limit=limit, after=after
    )
    return DeliveryList(data=rows, has_more=has_more)


@router.post(
    "/{endpoint_id}/deliveries/{delivery_id}/redeliver", status_code=202, response_model=DeliveryOut
)
def redeliver(delivery_id: str, endpoint: EndpointDep, session: SessionDep) -> DeliveryOut:
    return service.redeliver(session=session, endpoint=endpoint, delivery_id=delivery_id)
