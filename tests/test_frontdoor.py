"""`memfleet serve` under hostile input (issue #22), one test per finding, against a real server,
real workers and real clients: bounded amplification, no 5xx, one key per request, the key before
the body, timeouts for slow clients, and refusals that say what is wrong and nothing else."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from producer import keys
from producer.client import Memfleet
from producer.contract import MAX_METADATA_VALUE_CHARS
from producer.http.apikeys import KeyStore
from producer.http.mem0_routes import MAX_SKIPPED
from producer.keys import USER_JOBS_MAX, USER_JOBS_TTL
from tests.http_support import ApiServer, create_key, serving, token
from tests.support import uid

SECRET = "Zorblax-4921"


@pytest.fixture(scope="module")
def app_key(api_server: ApiServer) -> str:
    return create_key(api_server.redis_url, uid("door-app"), "--rate", "100000")


@pytest.fixture
def http(api_server: ApiServer, app_key: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api_server.url, headers=token(app_key), timeout=60) as client:
        yield client


def refused(answer: httpx.Response, status: int, kind: str | None = None) -> dict[str, Any]:
    """The answer is a refusal of ours: `status`, JSON with a kind and a detail, nothing of the secret."""
    assert answer.status_code == status, (answer.status_code, answer.text)
    body: dict[str, Any] = answer.json()
    assert isinstance(body["detail"], str) and body["kind"] == (kind or body["kind"])
    assert SECRET not in answer.text
    return body


def raw_json(client: httpx.Client, path: str, text: str) -> httpx.Response:
    """POST `text` as it is: a JSON escape such as \\ud800 must reach the server unencoded by the client."""
    return client.post(path, content=text.encode(), headers={"Content-Type": "application/json"})


async def stored(fleet: Memfleet, user: str) -> list[str]:
    return [m.text for m in (await fleet.list(user)).memories]


async def test_1_amplification_is_bounded(http: httpx.Client, fleet: Memfleet) -> None:
    """The issue's request: 200 messages and a 100,000-character metadata value (104 KB stored 20 MB)."""
    user = uid("amp")
    messages = [{"content": f"m{i}"} for i in range(200)]
    big = http.post("/api/memories", json={"user_id": user, "messages": messages, "metadata": {"note": "x" * 100_000}})
    assert "metadata" in refused(big, 422, "invalid_request")["detail"]
    # Within the value limit, but copied into 200 rows: over the per-write budget.
    note = {f"k{i}": "x" * (MAX_METADATA_VALUE_CHARS - 10) for i in range(3)}
    charged = http.post("/api/memories", json={"user_id": user, "messages": messages, "metadata": note})
    assert "bytes of metadata" in refused(charged, 422)["detail"]
    mem0 = http.post("/v3/memories/add/", json={"user_id": user, "messages": messages, "metadata": note})
    assert "bytes of metadata" in refused(mem0, 422)["detail"]
    assert await stored(fleet, user) == []


# (path, body) with {bad} where a string goes; each a place the issue found NUL or a surrogate to pass.
UNSAFE_PLACES = [
    ("/api/memories", '{"user_id": "%(u)s", "messages": [{"content": "ok"}, {"content": "a{bad}b"}]}'),
    ("/api/memories", '{"user_id": "%(u)s", "messages": [{"content": "hi", "name": "{bad}"}]}'),
    ("/api/memories", '{"user_id": "%(u)s", "messages": [{"content": "hi", "id": "{bad}"}]}'),
    ("/api/memories", '{"user_id": "%(u)s", "messages": [{"content": "hi"}], "metadata": {"k": "{bad}"}}'),
    ("/api/memories", '{"user_id": "%(u)s", "messages": [{"content": "hi", "metadata": {"k": "{bad}"}}]}'),
    ("/api/memories", '{"user_id": "%(u)s", "messages": [{"content": "hi"}], "metadata": {"{bad}": 1}}'),
    ("/api/memories/search", '{"user_id": "%(u)s", "query": "q{bad}"}'),
    ("/api/memories/search", '{"user_id": "%(u)s", "query": "q", "filters": {"k": "{bad}"}}'),
    ("/api/memories/search", '{"user_id": "%(u)s", "query": "q", "filters": {"OR": [{"k": {"in": ["{bad}"]}}]}}'),
    ("/api/memories/search", '{"user_id": "%(u)s{bad}", "query": "q"}'),
    ("/v3/memories/add/", '{"user_id": "%(u)s", "messages": [{"role": "user", "content": "ok {bad}"}]}'),
    ("/v3/memories/add/", '{"user_id": "%(u)s", "messages": [{"content": "ok"}], "metadata": {"k": "{bad}"}}'),
    ("/v3/memories/search/", '{"query": "q {bad}", "filters": {"user_id": "%(u)s"}}'),
    ("/v3/memories/search/", '{"query": "q", "filters": {"AND": [{"user_id": "%(u)s"}, {"k": "{bad}"}]}}'),
    ("/v3/memories/", '{"filters": {"user_id": "%(u)s{bad}"}}'),
]


@pytest.mark.parametrize("bad", ["\\u0000", "\\ud800", "\\udfff"], ids=["nul", "high-surrogate", "low-surrogate"])
async def test_2_and_7_nul_and_lone_surrogates_get_422_and_nothing_is_stored(
    http: httpx.Client, fleet: Memfleet, bad: str
) -> None:
    user = uid("nul")
    before = len(await fleet.dead_letters())
    for path, template in UNSAFE_PLACES:
        body = (template % {"u": user}).replace("{bad}", bad + SECRET)
        answer = raw_json(http, path, body)
        detail = refused(answer, 422)["detail"]
        assert any(why in detail for why in ("NUL", "surrogate", "user_id", "metadata key")), (path, detail)
    # The good message beside the bad one was not stored either, and nothing was dead-lettered.
    assert await stored(fleet, user) == []
    assert len(await fleet.dead_letters()) == before


def _address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def _exchange(address: tuple[str, int], data: bytes, within: float) -> bytes:
    """Send `data`, then read until the server closes the connection, which it must do `within`
    seconds: the socket's deadline, so a connection held open fails the test rather than hanging it."""
    with socket.create_connection(address, timeout=within) as sock:
        sock.sendall(data)
        said = b""
        try:
            while chunk := sock.recv(4096):
                said += chunk
        except TimeoutError:
            pytest.fail(f"the server held the connection open past {within} s; it had said {said[:200]!r}")
        return said


def _response(sock: socket.socket) -> bytes:
    """One whole response read from `sock` (its head, and a body of its Content-Length)."""
    said = b""
    while b"\r\n\r\n" not in said:
        said += sock.recv(4096)
    head, _, body = said.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    while len(body) < length:
        body += sock.recv(4096)
    return head + b"\r\n\r\n" + body


def _post_head(path: str, length: int, key: str | None = None) -> bytes:
    auth = f"Authorization: Token {key}\r\n" if key else ""
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def test_3_the_key_is_checked_before_the_body_is_read(api_server: ApiServer) -> None:
    address = _address(api_server.url)
    # Over the body limit, without a key: 401 (it was 413, so the body had been looked at first).
    said = _exchange(address, _post_head("/api/memories/search", 1_100_000) + b"x" * 65_536, within=20)
    assert said.startswith(b"HTTP/1.1 401"), said[:200]
    assert b'"kind": "unauthorized"' in said
    # A body promised and not sent: answered at once all the same (it was held open, unanswered),
    # and the connection closed, since the rest of the body will not be read.
    said = _exchange(address, _post_head("/api/memories", 1_048_576) + b"{" * 1024, within=4)
    assert said.startswith(b"HTTP/1.1 401") and b"connection: close" in said.lower(), said[:300]


def test_3_slow_heads_and_bodies_time_out(api_server: ApiServer, app_key: str) -> None:
    """A dedicated server with short timeouts: a body that does not arrive is answered 408, and a
    connection whose request head does not arrive (or that says nothing at all) is closed."""
    with serving(api_server.redis_url, {"MEMFLEET_API_BODY_TIMEOUT": "1", "MEMFLEET_API_HEADER_TIMEOUT": "1",
                                        "MEMFLEET_API_KEEP_ALIVE": "30"}) as server:
        address = _address(server.url)
        said = _exchange(address, _post_head("/api/memories", 1_048_576, app_key) + b"{" * 1024, within=10)
        assert said.startswith(b"HTTP/1.1 408"), said[:200]
        assert b'"kind": "body_timeout"' in said
        # A slow request head is cut off, and so is a connection that says nothing.
        assert _exchange(address, b"POST /api/memories HTTP/1.1\r\nHost: x\r\nContent-", within=10) == b""
        assert _exchange(address, b"", within=10) == b""
        # On a keep-alive connection (30 s), the next request's head has the same deadline.
        with socket.create_connection(address, timeout=10) as sock:  # a deadline, not a measure
            sock.sendall(b"GET /v1/ping/ HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _response(sock).startswith(b"HTTP/1.1 401")
            sock.sendall(b"GET /v1/ping/ HTTP/1.1\r\nHo")
            assert sock.recv(4096) == b""


@pytest.mark.parametrize("shape", [5, None, True, 1, "x", [1], {"k": 1}])
def test_4_filters_that_are_not_lists_get_422(http: httpx.Client, shape: Any) -> None:
    user = uid("shape")
    for op in ("AND", "OR", "NOT"):
        for answer in (
            http.post("/v3/memories/search/", json={"query": "q", "filters": {"user_id": user, op: shape}}),
            http.post("/v3/memories/search/", json={"query": "q", "filters": {op: shape}}),
            http.post("/v3/memories/", json={"filters": {"user_id": user, op: shape}}),
            http.post("/v3/memories/add/", json={"messages": [{"content": "hi"}], "user_id": user,
                                                 "filters": {op: shape}}),
            http.post("/api/memories/search", json={"user_id": user, "query": "q", "filters": {op: shape}}),
        ):
            assert op in refused(answer, 422)["detail"], answer.text
    assert http.get("/v1/ping/").status_code == 200, "the connection must survive"


async def test_5_a_get_all_page_costs_what_its_parameters_say(http: httpx.Client, fleet: Memfleet) -> None:
    user = uid("pages")
    await (await fleet.add(user, ["one", "two", "three"])).outcome()

    async def list_jobs() -> int:
        return (await fleet.stats()).counters.get("list:ok", 0)

    before = await list_jobs()
    deep = http.post("/v3/memories/", params={"page": 1_000_000_000, "page_size": 1},
                     json={"filters": {"user_id": user}})
    refused(deep, 422)
    over = http.post("/v3/memories/", params={"page": MAX_SKIPPED + 2, "page_size": 1},
                     json={"filters": {"user_id": user}})
    assert "page" in refused(over, 422)["detail"]
    assert await list_jobs() == before, "a refused page must run no job"
    # Page 3 of size 1 is the third memory; page 5 is past the end. Each costs at most two list jobs.
    third = http.post("/v3/memories/", params={"page": 3, "page_size": 1}, json={"filters": {"user_id": user}})
    assert third.status_code == 200 and third.json()["count"] == 1 and third.json()["next"] is None
    assert await list_jobs() - before <= 2
    past = http.post("/v3/memories/", params={"page": 5, "page_size": 1}, json={"filters": {"user_id": user}})
    assert past.status_code == 200 and past.json()["results"] == []
    assert await list_jobs() - before <= 4
    pages = [http.post("/v3/memories/", params={"page": p, "page_size": 1}, json={"filters": {"user_id": user}})
             .json()["results"][0]["memory"] for p in (1, 2, 3)]
    assert sorted(pages) == ["one", "three", "two"]


async def test_6_one_key_per_request(api_server: ApiServer, fleet: Memfleet, app_key: str) -> None:
    store = KeyStore(fleet.redis)
    _, alice = await store.create(uid("two-a"), user_id=uid("alice"))
    _, bob = await store.create(uid("two-b"), user_id=uid("bob"), rate_limit=1)
    both = [("Authorization", f"Token {alice}"), ("Authorization", f"Token {bob}")]
    mcp_call = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "list_memories",
                                                                              "arguments": {}}}
    with httpx.Client(base_url=api_server.url, timeout=30) as client:
        for answer in (
            client.get("/v1/ping/", headers=both),
            client.get("/api/memories", headers=both),
            client.post("/api/memories/search", headers=both, json={"query": "q"}),
            client.get("/metrics", headers=[("Authorization", f"Token {app_key}")] * 2),
        ):
            assert "one Authorization header" in refused(answer, 400, "invalid_request")["detail"]
        at_mcp = client.post("/mcp", headers=[*both, ("Accept", "application/json, text/event-stream")],
                             json=mcp_call)
    assert at_mcp.status_code == 400
    assert "one Authorization header" in at_mcp.json()["error"]["message"]


def test_8_host_header_is_not_reflected_in_links(http: httpx.Client) -> None:
    user = uid("host")
    http.post("/api/memories", json={"user_id": user, "messages": [{"content": "a"}, {"content": "b"}]})
    page = http.post("/v3/memories/", params={"page": 1, "page_size": 1}, json={"filters": {"user_id": user}},
                     headers={"Host": "evil.example"})
    assert page.status_code == 200
    links = [page.json()["next"], http.post("/v3/memories/", params={"page": 2, "page_size": 1},
                                            json={"filters": {"user_id": user}},
                                            headers={"Host": "evil.example"}).json()["previous"]]
    assert links == ["/v3/memories/?page=2&page_size=1", "/v3/memories/?page=1&page_size=1"]


async def test_8_get_mcp_answers_at_once(api_server: ApiServer, fleet: Memfleet) -> None:
    _, key = await KeyStore(fleet.redis).create(uid("mcp-get"), user_id=uid("carol"))
    # An answer, not an empty stream held open: the client's timeout is the deadline.
    with httpx.Client(base_url=api_server.url, timeout=5) as client:
        answer = client.get("/mcp", headers={**token(key), "Accept": "text/event-stream"})
    refused(answer, 405, "method_not_allowed")


def test_8_unknown_filter_conditions_on_mem0_add_are_refused(http: httpx.Client) -> None:
    user = uid("addf")
    answer = http.post("/v3/memories/add/", json={"messages": [{"content": "hi"}],
                                                  "filters": {"user_id": user, "topic": "food"}})
    assert "filters.user_id" in refused(answer, 422)["detail"]


async def test_8_a_users_job_set_is_bounded(fleet: Memfleet, http: httpx.Client) -> None:
    """The set keeps the newest op ids of the last week only, however long a user writes."""
    user = uid("jobs")
    stale = [f"w-{i:032x}" for i in range(5)]
    now_ms = time.time() * 1000
    # Ids older than the window, and more ids than the bound, as a user writing for long would leave.
    await fleet.redis.zadd(keys.user_jobs(user), {op: now_ms - USER_JOBS_TTL * 1000 - 1 for op in stale})
    await fleet.redis.zadd(keys.user_jobs(user), {f"w-{i:032x}": now_ms - 1000 + i / 1000
                                                  for i in range(100, 100 + USER_JOBS_MAX)})
    answer = http.post("/api/memories", json={"user_id": user, "messages": [{"content": "the newest"}]})
    assert answer.status_code == 200
    kept = [m.decode() for m in await fleet.redis.zrange(keys.user_jobs(user), 0, -1)]
    assert len(kept) == USER_JOBS_MAX and kept[-1] == answer.json()["op_id"]
    assert not set(stale) & set(kept) and f"w-{100:032x}" not in kept
    assert await fleet.redis.pttl(keys.user_jobs(user)) > (USER_JOBS_TTL - 60) * 1000
    assert http.get(f"/api/ops/{answer.json()['op_id']}", params={"user_id": user}).json()["done"] is True
    refused(http.get(f"/api/ops/{stale[0]}", params={"user_id": user}), 404, "not_found")
    await fleet.redis.delete(keys.user_jobs(user))


def test_refusals_carry_a_kind_and_never_what_was_sent(http: httpx.Client, api_server: ApiServer) -> None:
    extra = http.post("/api/memories/search", json={"user_id": "u1", "query": "q", f"{SECRET} as a key": 1})
    body = refused(extra, 422, "invalid_request")
    assert all(SECRET not in json.dumps(e) for e in body["errors"])
    surrogate_key = raw_json(http, "/api/memories/search", '{"user_id": "u1", "query": "q", "\\ud800": 1}')
    refused(surrogate_key, 422)  # a name that is not text cannot break the answer
    refused(http.post("/api/memories/search", json={"user_id": "a b", "query": "q"}), 422, "invalid_user_id")
    refused(raw_json(http, "/api/memories/search", '{"query": '), 400, "invalid_json")
    refused(http.get("/api/nowhere"), 404, "not_found")
    refused(http.delete("/api/stats"), 405, "method_not_allowed")
    with httpx.Client(base_url=api_server.url, timeout=30) as anonymous:
        refused(anonymous.get("/api/memories"), 401, "unauthorized")
    nan = raw_json(http, "/api/memories", '{"user_id": "u1", "messages": [{"content": "x"}], "metadata": {"k": NaN}}')
    assert "finite" in refused(nan, 422)["detail"]
    threshold = raw_json(http, "/v3/memories/search/", '{"query": "q", "filters": {"user_id": "u1"}, "threshold": NaN}')
    refused(threshold, 422)
