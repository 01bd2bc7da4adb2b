"""What the hosted backend's tests share: the stand-in of the mem0 platform (`api`), a
HostedBackend talking to it (`backend`), a guard that fails any connection beyond loopback, and
readers of what went over the wire. A test module imports the fixtures' functions (`*_fixture`),
and pytest finds them under their names."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from producer.contract import AddRequest, Message
from tests.hosted_standin import HostedStandIn, RecordedRequest
from workers.backends.hosted import HostedBackend
from workers.settings import WorkerConfig

TIMEOUT = 1.0  # seconds per request: the stand-in answers in milliseconds
ALICE, BOB = "alice", "bob"


@pytest.fixture(name="loopback_only", autouse=True)
def loopback_only_fixture(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail any test that tries to open a connection beyond 127.0.0.1 (telemetry, api.mem0.ai...)."""
    connect = socket.socket.connect

    def guarded(sock: socket.socket, address: Any) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1"):
            raise AssertionError(f"test tried to reach {address!r}")
        connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


@pytest.fixture(name="api")
def api_fixture() -> Iterator[HostedStandIn]:
    with HostedStandIn() as standin:
        yield standin


@pytest.fixture(name="backend")
async def backend_fixture(api: HostedStandIn) -> AsyncIterator[HostedBackend]:
    config = WorkerConfig(mem0_api_key="test-key", mem0_host=api.url)
    started = await HostedBackend.start(config, timeout=TIMEOUT)
    yield started
    await started.close()


def add_request(user_id: str, *texts: str, **metadata: Any) -> AddRequest:
    return AddRequest(user_id=user_id, messages=[Message(content=t) for t in texts], metadata=metadata)


def scopes_of(request: RecordedRequest) -> list[str]:
    """Every user id a request names: in its body, anywhere in its filters, or in its query string."""
    found: list[str] = list(request.query.get("user_id", []))

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "user_id":
                    found.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(request.body)
    return found


def memory_requests(api: HostedStandIn, since: int) -> list[RecordedRequest]:
    return [r for r in api.requests[since:] if r.path != "/v1/ping/"]
