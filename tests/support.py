"""Helpers shared by the tests."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import anyio
import pytest

from producer.client import Memfleet
from producer.contract import AddRequest

LOCOMO = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "locomo"


def uid(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def locomo_file(name: str = "conv-30.json") -> Path:
    path = LOCOMO / name
    if not path.is_file():
        pytest.skip(f"LoCoMo data not found at {path} (it lives in ../shared beside the repo)")
    return path


async def wait_for_workers(fleet: Memfleet, count: int, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while len((await fleet.stats()).workers) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"fewer than {count} workers came up within {timeout:g}s")
        await anyio.sleep(0.2)


def add_request(**fields: Any) -> AddRequest:
    """An AddRequest from plain data, as a producer would receive it."""
    return AddRequest.model_validate(fields)
