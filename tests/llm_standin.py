"""A local stand-in for an LLM server on the OpenAI chat-completions wire, for fact extraction.

Standard library only: a ThreadingHTTPServer on 127.0.0.1 (a free port) in a background thread,
answering `POST .../chat/completions` as OpenAI, vLLM, llama.cpp's server or Ollama do, with a JSON
object in mem0's extraction format (`{"memory": [{"id": "0", "text": ..., "attributed_to": ...}]}`)
and token usage. It records every prompt. By default each line of the prompt's "## New Messages"
section (`role: content`) becomes one fact, `User said: content`; a message that contains
`NO_FACTS` gives none. Knobs:

    with LlmStandIn() as llm:
        llm.latency = 0.5              # every answer waits this long
        llm.vary = True                # each call words its facts differently: "... (variant N)"
        llm.fail_next(2, 429, retry_after=1)   # the next two calls get a 429 (then 5xx, ...)
        llm.garbage_next(1)            # the next answer is not JSON
        llm.hold()                     # answers wait until `release()`; `held` counts the waiting
        llm.down() / llm.up()          # nothing listens on the port / the same port again
        ... llm.url (the base URL, ending in /v1) ... llm.prompts ...
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import socket
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

NO_FACTS = "NO_FACTS"


@dataclass(frozen=True)
class Prompt:
    model: str
    system: str
    user: str
    headers: dict[str, str]  # lower-case names
    response_format: Any
    at: float = field(default_factory=time.monotonic)

    def section(self, title: str) -> str:
        """One `## Title` section of mem0's extraction prompt, without its heading."""
        match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |^# Output|\Z)", self.user, re.S | re.M)
        return match.group(1).strip() if match else ""

    def new_messages(self) -> list[tuple[str, str]]:
        """(role, content) of each line of the "New Messages" section."""
        found = []
        for line in self.section("New Messages").splitlines():
            role, sep, content = line.partition(": ")
            if sep and role in ("user", "assistant", "system"):
                found.append((role, content))
        return found


@dataclass
class _Fault:
    status: int | None = None  # None: answer 200 with a body that is not JSON
    retry_after: float | None = None
    delay: float = 0.0


class LlmStandIn:
    def __init__(self, port: int = 0) -> None:
        self.prompts: list[Prompt] = []
        self.latency = 0.0
        self.vary = False
        self._port = port
        self._lock = threading.Lock()
        self._faults: deque[_Fault] = deque()
        self._calls: Counter[str] = Counter()  # per New Messages text, for `vary`
        self._released = threading.Event()
        self._released.set()
        self._closing = threading.Event()
        self._waiting = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._ids = itertools.count()
        self._connections: set[socket.socket] = set()

    # -- lifecycle ------------------------------------------------------------------------------------

    def __enter__(self) -> LlmStandIn:
        self.up()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._closing.set()  # wakes held and delayed answers
        self._released.set()
        self.down()

    def up(self) -> None:
        """Listen (again) on the stand-in's port."""
        self._server = ThreadingHTTPServer(("127.0.0.1", self._port), _handler_for(self))
        self._server.daemon_threads = True
        self._port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="llm-standin", daemon=True)
        self._thread.start()

    def down(self) -> None:
        """Stop listening and drop open connections: calls are refused until `up()`."""
        with self._lock:
            open_now, self._connections = list(self._connections), set()
        for conn in open_now:
            with contextlib.suppress(OSError):  # already closed by its client
                conn.shutdown(socket.SHUT_RDWR)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    @property
    def url(self) -> str:
        """The base URL an OpenAI client is given (`MEMFLEET_LLM_BASE_URL`)."""
        return f"http://127.0.0.1:{self._port}/v1"

    # -- test controls --------------------------------------------------------------------------------

    def fail_next(self, n: int, status: int, retry_after: float | None = None, delay: float = 0.0) -> None:
        with self._lock:
            self._faults.extend(_Fault(status, retry_after, delay) for _ in range(n))

    def garbage_next(self, n: int) -> None:
        """The next `n` answers are 200s whose message is not JSON."""
        with self._lock:
            self._faults.extend(_Fault(None) for _ in range(n))

    def delay_next(self, n: int, seconds: float) -> None:
        with self._lock:
            self._faults.extend(_Fault(200, None, seconds) for _ in range(n))

    def hold(self) -> None:
        """Answers wait until `release()` (the prompts are recorded as they come)."""
        self._released.clear()

    def release(self) -> None:
        self._released.set()

    @property
    def held(self) -> int:
        """Calls waiting for `release()`."""
        with self._lock:
            return self._waiting

    def reset(self) -> None:
        """Back to defaults: no latency, no faults, no variants, nothing held (prompts are kept)."""
        with self._lock:
            self._faults.clear()
        self.latency, self.vary = 0.0, False
        self._released.set()

    def prompts_with(self, text: str) -> list[Prompt]:
        with self._lock:
            return [p for p in self.prompts if text in p.user]

    # -- the API --------------------------------------------------------------------------------------

    def _answer(self, body: dict[str, Any], headers: dict[str, str]) -> tuple[int, bytes, dict[str, str]]:
        messages = body.get("messages") or []
        system = next((m.get("content", "") for m in messages if m.get("role") == "system"), "")
        user = next((m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), "")
        prompt = Prompt(str(body.get("model", "")), system, user, headers, body.get("response_format"))
        with self._lock:
            self.prompts.append(prompt)
            fault = self._faults.popleft() if self._faults else None
            self._waiting += 1
        try:
            self._released.wait()
        finally:
            with self._lock:
                self._waiting -= 1
        if fault is not None and fault.delay:
            self._closing.wait(fault.delay)
        if self.latency:
            self._closing.wait(self.latency)
        if fault is not None and fault.status not in (None, 200):
            extra = {} if fault.retry_after is None else {"Retry-After": f"{fault.retry_after:g}"}
            error = {"error": {"message": f"injected {fault.status}", "type": "server_error", "code": None}}
            return int(fault.status or 500), json.dumps(error).encode(), extra
        content = "I think the facts are: none of your business" if fault is not None and fault.status is None \
            else json.dumps({"memory": self._facts(prompt)})
        completion = {
            "id": f"chatcmpl-{next(self._ids)}", "object": "chat.completion", "created": int(time.time()),
            "model": prompt.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": len(system + user) // 4, "completion_tokens": len(content) // 4,
                      "total_tokens": (len(system + user) + len(content)) // 4},
        }
        return 200, json.dumps(completion).encode(), {}

    def _facts(self, prompt: Prompt) -> list[dict[str, str]]:
        said = prompt.new_messages()
        key = prompt.section("New Messages")
        with self._lock:
            self._calls[key] += 1
            call = self._calls[key]
        suffix = f" (variant {call})" if self.vary else ""
        return [{"id": str(i), "text": f"{role.capitalize()} said: {content}{suffix}", "attributed_to": role}
                for i, (role, content) in enumerate(said) if NO_FACTS not in content]


def _handler_for(llm: LlmStandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            with llm._lock:
                llm._connections.add(self.connection)

        def finish(self) -> None:
            with llm._lock:
                llm._connections.discard(self.connection)
            super().finish()

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            extra: dict[str, str] = {}
            if not self.path.rstrip("/").endswith("/chat/completions"):
                status, data = 404, b'{"error": {"message": "not found"}}'
            else:
                try:
                    body = json.loads(raw)
                except json.JSONDecodeError:
                    body = None
                if not isinstance(body, dict):
                    status, data = 400, b'{"error": {"message": "the body is not a JSON object"}}'
                else:
                    status, data, extra = llm._answer(body, {k.lower(): v for k, v in self.headers.items()})
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in extra.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True  # the client gave up waiting (it timed out)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # keep test output clean

    return Handler
