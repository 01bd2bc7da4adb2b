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

One memory at a time, as the platform's API reference (docs/openapi.json in mem0ai/mem0) describes:
get, update and delete by id (`/v1/memories/{id}/`), history (`/v1/memories/{id}/history/`) and the
batches (`PUT`/`DELETE /v1/batch/`). These are scoped to the project, not to a user: an id is found
whoever's it is, which is why the backend checks the owner itself. An unknown id gets 404. Memories
carry `user_id`, `created_at`, `updated_at` and `expiration_date` (YYYY-MM-DD): a memory whose date
is before today (UTC) is expired, and absent from get, list and search. Every change is recorded in
the memory's history (ADD, UPDATE, DELETE with old and new text), and, as mem0 does, the history of
a deleted memory stays, texts and all. Where the reference says nothing, the stand-in picks the
answer that is hardest on the client: a batch naming an unknown id gets 404 and changes nothing,
and an update's `timestamp` backdates `created_at` as an add's does.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from tests.standin_filters import matches, names_entity, words

PING = {"status": "ok", "org_id": "o", "project_id": "p", "user_email": "t@example.com"}
_ONE = re.compile(r"/v1/memories/([^/]+)/")
_HISTORY = re.compile(r"/v1/memories/([^/]+)/history/")
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
NOT_FOUND: tuple[int, Any, dict[str, str]] = (404, {"error": "Memory not found!"}, {})


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
    history: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # memory id -> events, oldest first

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
        """The user's memories as stored, expired ones included."""
        with self._lock:
            return [dict(m) for m in self.memories.get(user_id, [])]

    def set_expiration_date(self, memory_id: str, day: str | None) -> None:
        """Set a memory's `expiration_date` directly, as time passing would (a past date expires it)."""
        with self._lock:
            memory = self._stored(memory_id)
            assert memory is not None, "no such memory"
            memory["expiration_date"] = day

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
        if request.path == "/v1/batch/" and request.method in ("PUT", "DELETE"):
            return self._batch(request.method, request.body or {})
        if (match := _HISTORY.fullmatch(request.path)) and request.method == "GET":
            return self._history(match[1])
        if (match := _ONE.fullmatch(request.path)) and request.method in ("GET", "PUT", "DELETE"):
            return self._one(request.method, match[1], request.body or {})
        return 404, {"detail": "Not found."}, {}

    def _add(self, body: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        user_id = body.get("user_id")
        if not isinstance(user_id, str) or not body.get("messages"):
            return 400, {"detail": "messages and user_id are required"}, {}
        if (bad := _bad_date(body.get("expiration_date"))) is not None:
            return bad
        now = datetime.now(UTC).isoformat()
        created = _backdated(body.get("timestamp")) or now
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
                    "created_at": created,
                    "updated_at": now,
                    "expiration_date": body.get("expiration_date"),
                }
                self.memories.setdefault(user_id, []).append(memory)
                self._record(memory, "ADD", None, memory["memory"], now)
                added.append({"id": memory["id"], "memory": memory["memory"], "event": "ADD"})
        return 200, {"results": added, "message": "Memory added successfully.", "status": "SUCCEEDED",
                     "event_id": None}, {}

    def _search(self, body: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        filters = body.get("filters")
        if not isinstance(filters, dict) or not names_entity(filters):
            return 400, {"detail": "filters must name a user_id, agent_id, app_id or run_id"}, {}
        query_words = words(str(body.get("query", "")))
        scored = []
        for memory in self._matching(filters):
            text = memory["memory"].lower()
            overlap = len(query_words & words(text)) / max(len(query_words), 1)
            score = 1.0 if str(body.get("query", "")).lower().strip() in text else overlap
            if score > 0:
                scored.append({**memory, "score": round(score, 4)})
        scored.sort(key=lambda m: m["score"], reverse=True)
        return 200, {"results": scored[: int(body.get("top_k") or 10)]}, {}

    def _get_all(self, body: dict[str, Any], query: dict[str, list[str]]) -> tuple[int, Any, dict[str, str]]:
        filters = body.get("filters")
        if not isinstance(filters, dict) or not names_entity(filters):
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
        now = datetime.now(UTC).isoformat()
        with self._lock:
            for memory in self.memories.pop(users[0], []):
                self._record(memory, "DELETE", memory["memory"], None, now)
        return 200, {"message": "Memories deleted successfully!"}, {}

    def _one(self, method: str, memory_id: str, body: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        if not _UUID.fullmatch(memory_id):
            return 400, {"error": "memory_id should be a valid UUID"}, {}
        with self._lock:
            memory = self._visible(memory_id)
            if memory is None:
                return NOT_FOUND
            if method == "GET":
                return 200, dict(memory), {}
            if method == "DELETE":
                self._remove(memory)
                return 200, {"message": "Memory deleted successfully!"}, {}
            if not body.keys() & {"text", "metadata", "timestamp", "expiration_date"}:
                return 400, {"error": "give text, metadata, timestamp or expiration_date"}, {}
            if (bad := _bad_date(body.get("expiration_date"))) is not None:
                return bad
            self._change(memory, body)
            return 200, dict(memory), {}

    def _batch(self, method: str, body: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        items = body.get("memories")
        if not isinstance(items, list) or not items or len(items) > 1000:
            return 400, {"error": "memories must list 1 to 1000 memories"}, {}
        if not all(isinstance(i, dict) and _UUID.fullmatch(str(i.get("memory_id"))) for i in items):
            return 400, {"error": "every memory needs a valid memory_id"}, {}
        with self._lock:
            found = [self._visible(str(i["memory_id"])) for i in items]
            if any(m is None for m in found):
                return NOT_FOUND  # and nothing is changed
            for item, memory in zip(items, found, strict=True):
                assert memory is not None
                if method == "DELETE":
                    self._remove(memory)
                else:  # the batch takes text and metadata only
                    self._change(memory, {k: v for k, v in item.items() if k in ("text", "metadata")})
        verb = "deleted" if method == "DELETE" else "updated"
        return 200, {"message": f"Successfully {verb} {len(items)} memories"}, {}

    def _history(self, memory_id: str) -> tuple[int, Any, dict[str, str]]:
        with self._lock:
            events = [dict(e) for e in self.history.get(memory_id, [])]
        return (200, events, {}) if events else NOT_FOUND

    # Called with the lock held.
    def _stored(self, memory_id: str) -> dict[str, Any] | None:
        return next((m for ms in self.memories.values() for m in ms if m["id"] == memory_id), None)

    def _visible(self, memory_id: str) -> dict[str, Any] | None:
        memory = self._stored(memory_id)
        return None if memory is None or _expired(memory) else memory

    def _change(self, memory: dict[str, Any], body: dict[str, Any]) -> None:
        now = datetime.now(UTC).isoformat()
        old = memory["memory"]
        if "text" in body:
            memory["memory"] = body["text"]
        if "metadata" in body:
            memory["metadata"] = dict(body["metadata"] or {})
        if "expiration_date" in body:
            memory["expiration_date"] = body["expiration_date"]
        if (created := _backdated(body.get("timestamp"))) is not None:
            memory["created_at"] = created
        memory["updated_at"] = now
        self._record(memory, "UPDATE", old, memory["memory"], now)

    def _remove(self, memory: dict[str, Any]) -> None:
        self.memories[memory["user_id"]].remove(memory)
        self._record(memory, "DELETE", memory["memory"], None, datetime.now(UTC).isoformat())

    def _record(self, memory: dict[str, Any], event: str, old: str | None, new: str | None, at: str) -> None:
        self.history.setdefault(memory["id"], []).append({
            "id": str(uuid.uuid4()), "memory_id": memory["id"], "input": [], "old_memory": old, "new_memory": new,
            "user_id": memory["user_id"], "event": event, "metadata": memory["metadata"], "created_at": at,
            "updated_at": at,
        })

    def _matching(self, filters: dict[str, Any]) -> list[dict[str, Any]]:
        with self._lock:
            every = [dict(m) for memories in self.memories.values() for m in memories if not _expired(m)]
        return [m for m in every if matches(m, filters)]


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


def _expired(memory: dict[str, Any]) -> bool:
    """Expired from the day after its `expiration_date` (UTC) on."""
    day = memory.get("expiration_date")
    return day is not None and date.fromisoformat(day) < datetime.now(UTC).date()


def _bad_date(value: Any) -> tuple[int, Any, dict[str, str]] | None:
    if value is None:
        return None
    try:
        if isinstance(value, str) and len(value) == 10:
            date.fromisoformat(value)
            return None
    except ValueError:
        pass
    return 400, {"error": "expiration_date must be a date in YYYY-MM-DD format"}, {}


def _backdated(timestamp: Any) -> str | None:
    """`created_at` from a `timestamp` in Unix seconds (the platform backdates a memory by it)."""
    if timestamp is None:
        return None
    return datetime.fromtimestamp(float(timestamp), UTC).isoformat()
