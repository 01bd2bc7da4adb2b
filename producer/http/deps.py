"""FastAPI dependencies the routes share: who is asking, and the app's producer client."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader

from producer.client import Memfleet
from producer.http.auth import Principal, principal

# For the OpenAPI schema (and the Authorize button of /docs) only: `KeyGate` has checked the key
# before any route runs, and the route asks the gate's `Principal`, never this header.
_KEY = APIKeyHeader(name="Authorization", scheme_name="key", auto_error=False,
                    description="`Token <key>` (or `Bearer <key>`): one header, with an app key or a user key")


def _who(request: Request, _: Annotated[str | None, Security(_KEY)]) -> Principal:
    return principal(request)


def _fleet(request: Request) -> Memfleet:
    fleet: Memfleet = request.app.state.fleet
    return fleet


Who = Annotated[Principal, Depends(_who)]
Fleet = Annotated[Memfleet, Depends(_fleet)]
