"""`memfleet serve`, memfleet's own API: keys, scope, limits and errors, against a real server and workers."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from producer import keys
from producer.client import Memfleet
from producer.http.apikeys import KeyStore
from producer.services import RedisServer
from tests.http_support import ApiServer, create_key, serving, token
from tests.support import eventually, uid


@pytest.fixture(scope="module")
def app_key(api_server: ApiServer) -> str:
    return create_key(api_server.redis_url, uid("app"), "--rate", "100000")  # the rate limit has its own test


@pytest.fixture
def http(api_server: ApiServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api_server.url, timeout=60) as client:
        yield client


async def user_key(fleet: Memfleet, user: str, **options: Any) -> str:
    _, key = await KeyStore(fleet.redis).create(uid("k"), user_id=user, **options)
    return key


def test_cli_prints_the_key_last_and_lists_it_without_the_secret(api_server: ApiServer) -> None:
    import subprocess
    import sys

    name = uid("cli")
    key = create_key(api_server.redis_url, name, "--user", "carol", "--ttl", "60")
    assert key.startswith("mf.")
    listed = subprocess.run([sys.executable, "-m", "producer.cli", "keys", "list", "--json"], capture_output=True,
                            text=True, check=True, env={"REDIS_URL": api_server.redis_url, "PATH": ""})
    assert name in listed.stdout and "carol" in listed.stdout
    assert key.split(".")[2] not in listed.stdout, "keys list must not show the secret"
    refused = subprocess.run([sys.executable, "-m", "producer.cli", "keys", "create", uid("bad"), "--user", "a b"],
                             capture_output=True, text=True, env={"REDIS_URL": api_server.redis_url, "PATH": ""})
    assert refused.returncode == 2 and "user_id" in refused.stderr and "Traceback" not in refused.stderr


def test_missing_unknown_and_forged_keys_get_401(http: httpx.Client, app_key: str) -> None:
    assert http.get("/v1/ping/").status_code == 401
    assert http.get("/v1/ping/", headers=token("not-a-key")).status_code == 401
    key_id = app_key.split(".")[1]
    forged = http.get("/v1/ping/", headers=token(f"mf.{key_id}.{'A' * 43}"))
    assert forged.status_code == 401 and "unknown" in forged.json()["detail"]
    assert http.get("/v1/ping/", headers=token(app_key)).status_code == 200
    assert http.get("/v1/ping/", headers={"Authorization": f"Bearer {app_key}"}).status_code == 200


def test_revoked_key_is_refused_on_its_next_request(api_server: ApiServer, http: httpx.Client) -> None:
    import subprocess
    import sys

    name = uid("rev")
    key = create_key(api_server.redis_url, name)
    assert http.get("/v1/ping/", headers=token(key)).status_code == 200
    subprocess.run([sys.executable, "-m", "producer.cli", "keys", "revoke", name], check=True, capture_output=True,
                   env={"REDIS_URL": api_server.redis_url, "PATH": ""})
    assert http.get("/v1/ping/", headers=token(key)).status_code == 401


async def test_user_key_expires(fleet: Memfleet, http: httpx.Client) -> None:
    key = await user_key(fleet, uid("exp"), ttl=1)
    deadline = time.monotonic() + 10
    while http.get("/v1/ping/", headers=token(key)).status_code == 200:
        assert time.monotonic() < deadline, "a user key outlived its ttl"
        time.sleep(0.1)
    assert http.get("/v1/ping/", headers=token(key)).status_code == 401


async def test_add_search_list_forget_with_a_user_key(fleet: Memfleet, http: httpx.Client) -> None:
    user = uid("dora")
    auth = token(await user_key(fleet, user))
    added = http.post("/api/memories", headers=auth, json={"messages": [
        {"content": "I keep bees on the roof", "name": "Dora", "timestamp": "2023-05-18T13:47:00"},
        {"content": "My bike is green"}]})
    assert added.status_code == 200, added.text
    assert added.json()["user_id"] == user and added.json()["outcome"]["stored"] == 2

    queued = http.post("/api/memories", headers=auth, json={"messages": [{"content": "I like rye bread"}],
                                                            "wait": False})
    assert queued.status_code == 202 and queued.json()["done"] is False
    op_id = queued.json()["op_id"]
    deadline = time.monotonic() + 60
    while not (state := http.get(f"/api/ops/{op_id}", headers=auth).json())["done"]:
        assert time.monotonic() < deadline, "the queued write never took effect"
        time.sleep(0.05)
    assert state["outcome"]["stored"] == 1

    found = http.post("/api/memories/search", headers=auth, json={"query": "bees roof"}).json()["results"]
    assert found[0]["text"] == "I keep bees on the roof"
    # Records carry who said it and when, beside the message as written.
    assert (found[0]["name"], found[0]["timestamp"]) == ("Dora", "2023-05-18T13:47:00")
    assert {r["user_id"] for r in found} == {user}

    seen, cursor = [], None
    while True:
        page = http.get("/api/memories", headers=auth, params={"limit": 2, **({"cursor": cursor} if cursor else {})})
        assert page.status_code == 200, page.text
        seen += [m["text"] for m in page.json()["memories"]]
        if (cursor := page.json()["next_cursor"]) is None:
            break
    assert sorted(seen) == ["I keep bees on the roof", "I like rye bread", "My bike is green"]

    forgot = http.post("/api/forget", headers=auth, json={})
    assert forgot.status_code == 200 and forgot.json()["outcome"]["deleted"] == 3
    assert http.get("/api/memories", headers=auth).json()["memories"] == []


async def test_user_key_cannot_name_or_peek_at_another_user(fleet: Memfleet, http: httpx.Client, app_key: str) -> None:
    alice, bob = uid("alice"), uid("bob")
    bob_added = http.post("/api/memories", headers=token(app_key),
                          json={"user_id": bob, "messages": [{"content": "Bob's locker code is 4711"}]}).json()
    auth = token(await user_key(fleet, alice))
    refused = [
        http.post("/api/memories", headers=auth, json={"user_id": bob, "messages": [{"content": "x"}]}),
        http.post("/api/memories/search", headers=auth, json={"user_id": bob, "query": "locker code"}),
        http.get("/api/memories", headers=auth, params={"user_id": bob}),
        http.post("/api/forget", headers=auth, json={"user_id": bob}),
        http.get(f"/api/ops/{bob_added['op_id']}", headers=auth, params={"user_id": bob}),
    ]
    assert [r.status_code for r in refused] == [403] * 5
    assert all("4711" not in r.text for r in refused)
    # Bob's op id, asked for as Alice's own, is unknown to her.
    assert http.get(f"/api/ops/{bob_added['op_id']}", headers=auth).status_code == 404
    assert http.get("/api/stats", headers=auth).status_code == 403
    still = http.get("/api/memories", headers=token(app_key), params={"user_id": bob}).json()["memories"]
    assert [m["text"] for m in still] == ["Bob's locker code is 4711"]


def test_bad_requests_name_the_problem(http: httpx.Client, app_key: str) -> None:
    auth = {**token(app_key), "Content-Type": "application/json"}
    not_json = http.post("/api/memories/search", headers=auth, content=b'{"query": ')
    assert not_json.status_code == 400 and "not valid JSON" in not_json.json()["detail"]
    unknown = http.post("/api/memories/search", headers=auth, json={"user_id": "u1", "query": "q", "colour": "red"})
    assert unknown.status_code == 422 and "colour" in unknown.json()["detail"]
    for bad in ("", "a b", "*", "x" * 129, "ali\u0441e"):
        for response in (
            http.post("/api/memories/search", headers=auth, json={"user_id": bad, "query": "q"}),
            http.get("/api/memories", headers=auth, params={"user_id": bad}),
            http.get("/api/ops/w-1", headers=auth, params={"user_id": bad}),
        ):
            assert response.status_code == 422, (bad, response.text)
            assert "user_id" in response.json()["detail"]
    wrong_type = http.post("/api/memories/search", headers=auth, json={"user_id": 7, "query": "q"})
    assert wrong_type.status_code == 422 and "user_id" in wrong_type.json()["detail"]
    scope_filter = http.post("/api/memories/search", headers=auth,
                             json={"user_id": "u1", "query": "q", "filters": {"user_id": "u2"}})
    assert scope_filter.status_code == 422 and "user_id" in scope_filter.json()["detail"]
    blank = http.post("/api/memories", headers=auth, json={"user_id": "u1", "messages": [{"content": "  "}]})
    assert blank.status_code == 422 and "blank" in blank.json()["detail"]
    no_user = http.post("/api/memories/search", headers=auth, json={"query": "q"})
    assert no_user.status_code == 422 and "name the user" in no_user.json()["detail"]
    bad_cursor = http.get("/api/memories", headers=auth, params={"user_id": "u1", "cursor": "no/such"})
    assert bad_cursor.status_code == 422 and "cursor" in bad_cursor.json()["detail"]


def test_oversized_bodies_get_413(http: httpx.Client, app_key: str) -> None:
    big = b'{"user_id": "u1", "query": "' + b"x" * 2_000_000 + b'"}'
    declared = http.post("/api/memories/search", headers={**token(app_key), "Content-Type": "application/json"},
                         content=big)
    assert declared.status_code == 413 and "limit" in declared.json()["detail"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: sent chunked
        for start in range(0, len(big), 65536):
            yield big[start : start + 65536]

    chunked = http.post("/api/memories/search", headers={**token(app_key), "Content-Type": "application/json"},
                        content=chunks())
    assert chunked.status_code == 413


async def test_rate_limit_answers_429_with_retry_after(fleet: Memfleet, http: httpx.Client) -> None:
    key = await user_key(fleet, uid("busy"), rate_limit=3)
    answers = [http.get("/v1/ping/", headers=token(key)) for _ in range(20)]
    limited = [a for a in answers if a.status_code == 429]
    assert limited, "20 requests at a limit of 3 a second were all let through"
    assert all(a.status_code in (200, 429) for a in answers)
    assert int(limited[0].headers["Retry-After"]) >= 1
    assert "rate limit" in limited[0].json()["detail"]


def test_no_worker_gets_504_with_the_cli_advice() -> None:
    redis = RedisServer().start()
    try:
        key = create_key(redis.url, "lonely")
        with serving(redis.url, {"MEMFLEET_SEARCH_TIMEOUT": "0.5"}) as server:
            answer = httpx.post(f"{server.url}/api/memories/search", headers=token(key), timeout=30,
                                json={"user_id": "u1", "query": "anyone there?"})
    finally:
        redis.stop()
    assert answer.status_code == 504
    assert "memfleet worker" in answer.json()["detail"]


def test_metrics_need_an_app_key_and_show_the_fleet(api_server: ApiServer, http: httpx.Client, app_key: str) -> None:
    user = uid("m")
    http.post("/api/memories/search", headers=token(app_key), json={"user_id": user, "query": "q"})
    scraped = http.get("/metrics", headers=token(app_key))
    assert scraped.status_code == 200
    text = scraped.text
    for metric in ("memfleet_jobs_total{", "memfleet_queue_depth{", "memfleet_oldest_queued_seconds",
                   "memfleet_live_workers 2.0", "memfleet_dead_letters", "memfleet_foreign_results_dropped_total",
                   'memfleet_api_job_seconds_bucket{kind="search",le="0.005",outcome="ok"}'):
        assert metric in text, metric
    assert user not in text, "user ids must not become labels"
    assert http.get("/metrics").status_code == 401


EncoderSamples = dict[tuple[str, str, str], float]  # (metric, worker, encoder) -> value


def _encoder_samples(http: httpx.Client, app_key: str) -> EncoderSamples:
    scraped = http.get("/metrics", headers=token(app_key))
    assert scraped.status_code == 200
    found: EncoderSamples = {}
    for family in text_string_to_metric_families(scraped.text):
        if family.name.startswith("memfleet_encoder_"):
            assert family.type == "counter", family.name
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    found[(sample.name, sample.labels["worker"], sample.labels["encoder"])] = sample.value
    return found


def _total(samples: EncoderSamples, metric: str, encoder: str) -> float:
    return sum(v for (name, _, enc), v in samples.items() if name == metric and enc == encoder)


async def test_metrics_show_each_workers_encoder_at_work(fleet: Memfleet, http: httpx.Client, app_key: str) -> None:
    before = _encoder_samples(http, app_key)
    user, messages = uid("enc"), [f"encoder utilisation {uid()}" for _ in range(3)]
    await (await fleet.add(user, messages)).outcome()
    await fleet.search(user, "utilisation")
    live = set((await fleet.stats()).workers)
    scraped: EncoderSamples = {}

    def counted() -> bool:
        # Workers publish every few seconds: wait for the scrape that includes this add and search.
        nonlocal scraped
        scraped = _encoder_samples(http, app_key)
        texts = "memfleet_encoder_texts_total"
        return (_total(scraped, texts, "bulk") >= _total(before, texts, "bulk") + len(messages)
                and _total(scraped, texts, "query") >= _total(before, texts, "query") + 1
                and live <= {worker for _, worker, _ in scraped})

    await eventually(counted, 20, "the add's and the search's texts in every live worker's encoder counters")
    busy = {(w, enc): v for (name, w, enc), v in scraped.items() if name == "memfleet_encoder_busy_seconds_total"}
    assert any(v > 0 for (_, enc), v in busy.items() if enc == "bulk"), busy
    assert any(v > 0 for (_, enc), v in busy.items() if enc == "query"), busy
    cpu = {(w, enc): v for (name, w, enc), v in scraped.items() if name == "memfleet_encoder_cpu_seconds_total"}
    assert any(v > 0 for (_, enc), v in cpu.items() if enc == "bulk"), cpu
    assert all(v <= busy[key] * 1.05 + 0.01 for key, v in cpu.items()), "CPU time is within the busy time"
    assert user not in str(scraped)
    for worker in live:  # the counters of a worker that dies expire with it
        assert 0 < await fleet.redis.ttl(keys.ENCODER_USE + worker) <= keys.ENCODER_USE_TTL


async def test_metrics_count_how_each_workers_searches_were_ranked(
        fleet: Memfleet, http: httpx.Client, app_key: str) -> None:
    """The session's workers keep every user's search index once they search again (conftest)."""
    user = uid("ranked")
    await (await fleet.add(user, [f"where the index lives {uid()}" for _ in range(3)])).outcome()

    def scraped() -> dict[str, float]:
        found: dict[str, float] = {}
        for family in text_string_to_metric_families(http.get("/metrics", headers=token(app_key)).text):
            for sample in family.samples:
                if family.name.startswith("memfleet_search"):
                    key = sample.name + sample.labels.get("ranked", "")
                    found[key] = found.get(key, 0.0) + sample.value
        return found

    before = scraped()

    async def from_memory() -> bool:
        await fleet.search(user, "where does the index live")
        return scraped().get("memfleet_searches_totalmemory", 0) > before.get("memfleet_searches_totalmemory", 0)

    await eventually(from_memory, 30, "a search ranked from an index held in memory", interval=0.5)
    now = scraped()
    assert now["memfleet_search_index_reads_total"] > before.get("memfleet_search_index_reads_total", 0)
    assert now["memfleet_search_index_held"] >= 1 and now["memfleet_search_index_bytes"] > 0
    assert now["memfleet_searches_totalsql"] >= 1  # the user's first search, at least
    assert user not in http.get("/metrics", headers=token(app_key)).text


async def test_metrics_refuse_a_user_key(fleet: Memfleet, http: httpx.Client) -> None:
    assert http.get("/metrics", headers=token(await user_key(fleet, uid()))).status_code == 403


def test_openapi_documents_the_api(http: httpx.Client) -> None:
    paths = http.get("/openapi.json").json()["paths"]
    assert {"/api/memories", "/api/memories/search", "/api/forget", "/api/ops/{op_id}", "/api/stats"} <= set(paths)
    assert http.get("/docs").status_code == 200


ROUTES = [("POST", "/v3/memories/add/"), ("POST", "/v3/memories/search/"), ("POST", "/v3/memories/"),
          ("POST", "/api/memories"), ("POST", "/api/memories/search"), ("POST", "/api/forget")]
GARBAGE = [b"", b"[]", b'"x"', b"null", b"{}", b"\xff\xfe\x00", b'{"messages": 5}', b'{"query": ["a"]}',
           b'{"messages": [{"content": "x", "role": "system"}], "user_id": "u1"}',
           b'{"messages": [{"content": "x"}], "user_id": "u1", "timestamp": 1e30}',
           b'{"query": "q", "filters": {"user_id": "u1", "AND": [{"NOT": [{"a": 1}]}]}}',
           b'{"query": "q", "filters": {"OR": "x"}, "user_id": "u1"}', b'{"' + b"a" * 5000 + b'": 1}']


def test_garbage_never_gets_a_500(http: httpx.Client, app_key: str) -> None:
    auth = {**token(app_key), "Content-Type": "application/json"}
    for method, path in ROUTES:
        for body in GARBAGE:
            answer = http.request(method, path, headers=auth, content=body)
            assert answer.status_code in (400, 422), (path, body[:60], answer.status_code, answer.text[:200])
            assert answer.json()["detail"], (path, body[:60])
    for params in ({"user_id": "u1", "limit": "0"}, {"user_id": "u1", "limit": "x"}, {"user_id": "u1", "cursor": ""}):
        assert http.get("/api/memories", headers=auth, params=params).status_code == 422, params
    assert http.delete("/v1/memories/", headers=auth).status_code == 422  # an app key naming no user
    assert http.post("/v3/memories/", headers=auth, params={"page": "0"}, json={}).status_code == 422
