"""No message or memory text in logs; nothing sent off the machine by default."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from producer.client import Memfleet
from producer.services import RedisServer, stop_workers, worker_command
from producer.settings import ProducerSettings
from tests.support import uid, wait_for_workers

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
            with pytest.raises(ValueError):
                await fleet.list(user, cursor="not-a-cursor-" + "Zorblax")
            await (await fleet.forget(user)).outcome()
    finally:
        assert stop_workers([worker]) == 0
        server.stop()
    text = log_path.read_text()
    assert "Zorblax" not in text and "4921" not in text
    jobs = [line for line in text.splitlines() if '"event": "job"' in line]
    assert len(jobs) >= 5
    assert all('"user_id"' in line and '"duration_ms"' in line and '"outcome"' in line for line in jobs)


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
