"""FastAPI dependencies the routes share: who is asking, and the app's producer client."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from producer.client import Memfleet
from producer.http.auth import Principal, principal


def _fleet(request: Request) -> Memfleet:
    fleet: Memfleet = request.app.state.fleet
    return fleet


Who = Annotated[Principal, Depends(principal)]
Fleet = Annotated[Memfleet, Depends(_fleet)]
