"""A local stand-in for the hosted mem0 platform API: the endpoints `mem0.AsyncMemoryClient` calls.

Standard library only: a ThreadingHTTPServer on 127.0.0.1 (a free port) in a background thread.
Memories are kept in memory as given (no inference), search scores by word overlap, and every
request is recorded so tests can check what went over the wire. Faults can be queued:

    with HostedStandIn() as api:
        api.fail_next(1, 429, retry_after=7)   # the next request gets a 429 with Retry-After: 7
        api.delay_next(1, 2.0)                 # the one after waits 2 s before answering
        ... api.url ... api.requests ...

Like the platform, it refuses (400) an add, search, list or delete that names no user, instead of
acting on the whole project.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

PING = {"status": "ok", "org_id": "o", "project_id": "p", "user_email": "t@example.com"}
ENTITY_KEYS = ("user_id", "agent_id", "app_id", "run_id")


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    query: dict[str, list[str]]
    body: Any  # the decoded JSON body, None if there was none
    headers: dict[str, str]  # lower-case names
    at: float = field(default_factory=time.monotonic)


@dataclass
class _Fault:
    status: int | None = None
    retry_after: float | None = None
    delay: float = 0.0


@dataclass
class HostedStandIn:
    requests: list[RecordedRequest] = field(default_factory=list)
    memories: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # user id -> memories

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: deque[_Fault] = deque()
        self._closing = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------------------

    def __enter__(self) -> HostedStandIn:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="hosted-standin", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._closing.set()  # wakes delayed handlers
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    @property
    def url(self) -> str:
        assert self._server is not None, "use HostedStandIn as a context manager"
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    # -- test controls --------------------------------------------------------------------------------

    def fail_next(self, n: int, status: int, retry_after: float | None = None, delay: float = 0.0) -> None:
        """Answer the next `n` requests (whatever they are) with `status` and a JSON error body,
        after `delay` seconds, without applying them."""
        with self._lock:
            self._faults.extend(_Fault(status=status, retry_after=retry_after, delay=delay) for _ in range(n))

    def delay_next(self, n: int, seconds: float) -> None:
        """Make the next `n` requests wait `seconds` before being answered normally."""
        with self._lock:
            self._faults.extend(_Fault(delay=seconds) for _ in range(n))

    def heal(self) -> None:
        """Drop the faults not yet served: the API is healthy again."""
        with self._lock:
            self._faults.clear()

    def requests_to(self, path: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path == path]

    def user_memories(self, user_id: str) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.memories.get(user_id, []))

    # -- the API --------------------------------------------------------------------------------------

    def _handle(self, request: RecordedRequest) -> tuple[int, Any, dict[str, str]]:
        with self._lock:
            self.requests.append(request)
            fault = self._faults.popleft() if self._faults else None
        if fault is not None and fault.delay:
            self._closing.wait(fault.delay)
        if fault is not None and fault.status is not None:
            headers = {} if fault.retry_after is None else {"Retry-After": f"{fault.retry_after:g}"}
            # The detail quotes the request, as real error bodies may: clients must not pass it on.
            detail = f"injected failure for {json.dumps(request.body)}"
            return fault.status, {"detail": detail}, headers
        if not request.headers.get("authorization", "").startswith("Token "):
            return 401, {"detail": "Authentication credentials were not provided."}, {}
        route = (request.method, request.path)
        if route == ("GET", "/v1/ping/"):
            return 200, PING, {}
        if route == ("POST", "/v3/memories/add/"):
            return self._add(request.body or {})
        if route == ("POST", "/v3/memories/search/"):
            return self._search(request.body or {})
        if route == ("POST", "/v3/memories/"):
            return self._get_all(request.body or {}, request.query)
        if route == ("DELETE", "/v1/memories/"):
            return self._delete_all(request.query)
        return 404, {"detail": "Not found."}, {}

    def _add(self, body: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        user_id = body.get("user_id")
        if not isinstance(user_id, str) or not body.get("messages"):
            return 400, {"detail": "messages and user_id are required"}, {}
        now = datetime.now(UTC).isoformat()
        added = []
        with self._lock:
            for message in body["messages"]:
                memory = {
                    "id": str(uuid.uuid4()),
                    "memory": message["content"],
                    "user_id": user_id,
                    "metadata": dict(body.get("metadata") or {}),
                    "role": message.get("role", "user"),
                    "actor_id": message.get("name"),
                    "created_at": now,
                    "updated_at": now,
                }
                self.memories.setdefault(user_id, []).append(memory)
                added.append({"id": memory["id"], "memory": memory["memory"], "event": "ADD"})
        return 200, {"results": added, "message": "Memory added successfully.", "status": "SUCCEEDED",
                     "event_id": None}, {}

    def _search(self, body: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        filters = body.get("filters")
        if not isinstance(filters, dict) or not _names_entity(filters):
            return 400, {"detail": "filters must name a user_id, agent_id, app_id or run_id"}, {}
        query_words = _words(str(body.get("query", "")))
        scored = []
        for memory in self._matching(filters):
            text = memory["memory"].lower()
            overlap = len(query_words & _words(text)) / max(len(query_words), 1)
            score = 1.0 if str(body.get("query", "")).lower().strip() in text else overlap
            if score > 0:
                scored.append({**memory, "score": round(score, 4)})
        scored.sort(key=lambda m: m["score"], reverse=True)
        return 200, {"results": scored[: int(body.get("top_k") or 10)]}, {}

    def _get_all(self, body: dict[str, Any], query: dict[str, list[str]]) -> tuple[int, Any, dict[str, str]]:
        filters = body.get("filters")
        if not isinstance(filters, dict) or not _names_entity(filters):
            return 400, {"detail": "filters must name a user_id, agent_id, app_id or run_id"}, {}
        page = int(query.get("page", ["1"])[-1])
        page_size = int(query.get("page_size", ["100"])[-1])
        rows = self._matching(filters)
        start = (page - 1) * page_size
        more = len(rows) > start + page_size
        next_url = f"{self.url}/v3/memories/?{urlencode({'page': page + 1, 'page_size': page_size})}"
        return 200, {"count": len(rows), "next": next_url if more else None, "previous": None,
                     "results": rows[start : start + page_size]}, {}

    def _delete_all(self, query: dict[str, list[str]]) -> tuple[int, Any, dict[str, str]]:
        users = query.get("user_id", [])
        if len(users) != 1:
            return 400, {"detail": "exactly one user_id is required"}, {}
        with self._lock:
            self.memories.pop(users[0], None)
        return 200, {"message": "Memories deleted successfully!"}, {}

    def _matching(self, filters: dict[str, Any]) -> list[dict[str, Any]]:
        with self._lock:
            every = [m for memories in self.memories.values() for m in memories]
        return [m for m in every if _matches(m, filters)]


def _handler_for(api: HostedStandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            parts = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            request = RecordedRequest(
                method=self.command,
                path=parts.path,
                query=parse_qs(parts.query),
                body=json.loads(raw) if raw else None,
                headers={k.lower(): v for k, v in self.headers.items()},
            )
            status, payload, headers = api._handle(request)
            data = json.dumps(payload).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True  # the client gave up waiting (a delayed request)

        do_GET = do_POST = do_DELETE = do_PUT = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass  # keep test output clean

    return Handler


def _words(text: str) -> set[str]:
    return set(re.findall(r"\w+", text.lower()))


def _names_entity(filters: dict[str, Any]) -> bool:
    """True if the filters pin an entity at the top level or in a top-level AND."""
    if any(key in filters for key in ENTITY_KEYS):
        return True
    return any(isinstance(term, dict) and _names_entity(term) for term in filters.get("AND", []))


def _matches(memory: dict[str, Any], filters: dict[str, Any]) -> bool:
    for key, condition in filters.items():
        if key == "AND":
            ok = all(_matches(memory, term) for term in condition)
        elif key == "OR":
            ok = any(_matches(memory, term) for term in condition)
        elif key == "NOT":
            ok = not any(_matches(memory, term) for term in condition)
        else:
            value = memory.get(key) if key in (*ENTITY_KEYS, "created_at") else memory["metadata"].get(key)
            ok = _compare(value, condition)
        if not ok:
            return False
    return True


_OPERATORS: dict[str, Callable[[Any, Any], bool]] = {
    "eq": lambda v, c: bool(v == c),
    "ne": lambda v, c: bool(v != c),
    "in": lambda v, c: v in c,
    "nin": lambda v, c: v not in c,
    "gt": lambda v, c: v is not None and bool(v > c),
    "gte": lambda v, c: v is not None and bool(v >= c),
    "lt": lambda v, c: v is not None and bool(v < c),
    "lte": lambda v, c: v is not None and bool(v <= c),
    "contains": lambda v, c: isinstance(v, str) and str(c) in v,
    "icontains": lambda v, c: isinstance(v, str) and str(c).lower() in v.lower(),
}


def _compare(value: Any, condition: Any) -> bool:
    if condition == "*":
        return value is not None
    if not isinstance(condition, dict):
        return bool(value == condition)
    return all(op in _OPERATORS and _OPERATORS[op](value, operand) for op, operand in condition.items())
