"""No message or memory text in logs; nothing sent off the machine by default."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import psycopg
import pytest

from producer.client import Memfleet
from producer.errors import JobFailed, WriteDeadLettered
from producer.services import RedisServer, stop_workers, worker_command
from producer.settings import ProducerSettings
from tests.http_support import create_key, serving, token
from tests.support import uid, wait_for_workers
from workers.backends.pg_server import stop_embedded_postgres

pytestmark = pytest.mark.slow

SECRET = "my bank PIN is 4921 and my dog is called Zorblax"


async def test_worker_logs_carry_ids_and_timings_never_text(tmp_path: Path) -> None:
    server = RedisServer().start()
    log_path = tmp_path / "worker.log"
    env = {**os.environ, "REDIS_URL": server.url, "MEMFLEET_DATA_DIR": str(tmp_path / "data"),
           "MEMFLEET_LOG_FORMAT": "json", "MEMFLEET_LOG_LEVEL": "DEBUG"}
    with log_path.open("wb") as log:
        worker = subprocess.Popen(worker_command(), env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        async with await Memfleet.connect(ProducerSettings(redis_url=server.url)) as fleet:
            await wait_for_workers(fleet, 1)
            user = uid("private")
            await (await fleet.add(user, [SECRET], metadata={"topic": "Zorblax"})).outcome()
            assert (await fleet.search(user, "what is my dog called Zorblax?"))[0].text == SECRET
            await fleet.list(user)
            with pytest.raises(ValueError):  # refused by the contract, before it is queued
                await fleet.list(user, cursor="not-a-cursor-" + "Zorblax")
            with pytest.raises(ValueError):  # a page number, which only the hosted backend hands out
                await fleet.list(user, cursor="7")
            await (await fleet.forget(user)).outcome()
    finally:
        assert stop_workers([worker]) == 0
        server.stop()
    text = log_path.read_text()
    assert "Zorblax" not in text and "4921" not in text
    jobs = [line for line in text.splitlines() if '"event": "job"' in line]
    assert len(jobs) >= 5
    assert all('"user_id"' in line and '"duration_ms"' in line and '"outcome"' in line for line in jobs)


# The embedded PostgreSQL's own `to_tsvector(regconfig, text)`, shadowed (public before pg_catalog)
# by one that refuses any text with the canary in it, quoting it, as PostgreSQL's errors quote data.
_REFUSE_CANARY = """
CREATE OR REPLACE FUNCTION public.to_tsvector(config regconfig, body text) RETURNS tsvector
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF body LIKE '%CANARY-%' THEN
        RAISE EXCEPTION 'refused to index: %', body;
    END IF;
    RETURN pg_catalog.to_tsvector(config, body);
END $$
"""


async def test_a_database_error_quoting_a_message_reaches_no_log_and_no_answer(tmp_path: Path) -> None:
    """Issue #22: PostgreSQL refuses a message and its error quotes it. Neither the HTTP answers, the
    Python API's errors, the dead letter's reason, nor any log (worker, API server, PostgreSQL's own)
    may carry its text."""
    from workers.backends.pg_server import prepare_database, start_embedded_postgres

    canary = f"CANARY-{uid()}"
    secret = f"my locker code is 4711 ({canary})"
    data, logs = tmp_path / "data", tmp_path / "logs"
    logs.mkdir()
    pg_url = start_embedded_postgres(data)
    server = RedisServer().start()
    worker: subprocess.Popen[bytes] | None = None
    try:
        prepare_database(pg_url)
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(_REFUSE_CANARY)
            conn.execute("ALTER DATABASE postgres SET search_path = public, pg_catalog")
        env = {**os.environ, "REDIS_URL": server.url, "MEMFLEET_DATA_DIR": str(data), "MEMFLEET_LOG_FORMAT": "json",
               "MEMFLEET_LOG_LEVEL": "DEBUG"}
        with (logs / "worker.log").open("wb") as log:
            worker = subprocess.Popen(worker_command(), env=env, stdout=log, stderr=subprocess.STDOUT)
        key = create_key(server.url, "canary-app")
        user = uid("canary")
        async with await Memfleet.connect(ProducerSettings(redis_url=server.url, search_timeout=60)) as fleet:
            await wait_for_workers(fleet, 1)
            await (await fleet.add(user, ["a message that stores fine"])).outcome()
            with serving(server.url, {"MEMFLEET_LOG_LEVEL": "DEBUG"}, log=logs / "api.log") as api, \
                    httpx.Client(base_url=api.url, headers=token(key), timeout=120) as http:
                three = [{"content": "good one"}, {"content": secret}, {"content": "good two"}]
                answers = [
                    http.post("/api/memories", json={"user_id": user, "messages": three}),
                    http.post("/v3/memories/add/", json={"user_id": user, "messages": three}),
                    http.post("/api/memories/search", json={"user_id": user, "query": secret}),
                    http.post("/v3/memories/search/", json={"query": secret, "filters": {"user_id": user}}),
                ]
            assert answers[0].status_code == 200 and answers[0].json()["outcome"]["error"], answers[0].text
            assert [a.status_code for a in answers[1:]] == [502, 502, 502], [a.text for a in answers]
            assert [a.json()["kind"] for a in answers[1:]] == ["write_dead_lettered", "job_failed", "job_failed"]
            with pytest.raises(WriteDeadLettered) as dead:
                await (await fleet.add(user, [secret])).outcome()
            with pytest.raises(JobFailed) as failed:
                await fleet.search(user, secret)
            reasons = [d.reason for d in await fleet.dead_letters()]
    finally:
        if worker is not None:
            assert stop_workers([worker]) == 0
        server.stop()
        stop_embedded_postgres(data)
    told = [a.text for a in answers] + [str(dead.value), str(failed.value)] + reasons
    assert len(reasons) == 3 and all(r.startswith("BackendRejected: ") and "(RaiseException)" in r for r in reasons), \
        reasons
    assert not [t for t in told if canary in t], "an answer or error quotes the refused message"
    written = {path.name: path.read_text(errors="replace") for path in [*logs.iterdir(), data / "pg" / "log"]}
    assert '"dead_letter"' in written["worker.log"] and "RaiseException" in written["worker.log"], \
        "the store's refusal must have happened (and been logged by class)"
    assert [name for name, text in written.items() if canary in text] == [], "a log quotes the refused message"


def test_mem0_telemetry_is_off_unless_asked_for() -> None:
    probe = ("from workers.process import set_up_process; set_up_process(); "
             "import mem0.memory.telemetry as t; print(t.MEM0_TELEMETRY)")
    env = {k: v for k, v in os.environ.items() if k not in ("MEM0_TELEMETRY", "MEMFLEET_TELEMETRY")}
    off = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert off.stdout.strip() == "False", off.stderr
    on = subprocess.run([sys.executable, "-c", probe], env={**env, "MEMFLEET_TELEMETRY": "true"},
                        capture_output=True, text=True, timeout=120)
    assert on.stdout.strip() == "True", on.stderr


def test_onnx_runtime_telemetry_is_off_unless_asked_for(tmp_path: Path) -> None:
    """ONNX Runtime's telemetry writes a device id into ~/.cache before it sends anything: a worker's
    encoder must leave the home directory empty."""
    probe = ("import os; from workers.process import set_up_process; set_up_process(); "
             "from workers.model import load_model; from workers.onnx_encoder import onnx_encoder; "
             "onnx_encoder(load_model()).encode(['hello']); print(os.environ.get('ORT_DISABLE_TELEMETRY'))")
    env = {k: v for k, v in os.environ.items() if k not in ("ORT_DISABLE_TELEMETRY", "MEMFLEET_TELEMETRY")}
    home = tmp_path / "home"
    home.mkdir()
    off = subprocess.run([sys.executable, "-c", probe], env={**env, "HOME": str(home)}, capture_output=True,
                         text=True, timeout=300)
    assert off.stdout.strip() == "1", off.stderr[-2000:]
    assert list(home.rglob("*")) == [], "ONNX Runtime wrote into the home directory"
    on = subprocess.run([sys.executable, "-c", "import os; from workers.process import set_up_process; "
                         "set_up_process(); print(os.environ.get('ORT_DISABLE_TELEMETRY'))"],
                        env={**env, "MEMFLEET_TELEMETRY": "true"}, capture_output=True, text=True, timeout=120)
    assert on.stdout.strip() == "None", on.stderr[-2000:]
