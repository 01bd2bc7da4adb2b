"""What the suite starts, and making sure it stops: leftover checks and the embedded PostgreSQL.

The machine is shared, so the session counts as its own only what it can trace to itself: its
child processes (redis-servers, workers, CLI runs), anything carrying `SESSION_MARKER` in its
environment (inherited by the children of those: `memfleet worker`'s workers), and anything whose
command line names the session's temporary directory (the embedded PostgreSQL servers, which
detach from the worker that starts them). redis-server and PostgreSQL rewrite their process titles
over their environment, hence the other two ways.
"""

from __future__ import annotations

import os
import time
import uuid

import psutil  # type: ignore[import-untyped]

SESSION_MARKER = "MEMFLEET_TEST_SESSION"


def mark_session() -> str:
    """Tag this process's environment; children inherit the tag."""
    return os.environ.setdefault(SESSION_MARKER, uuid.uuid4().hex)


def started_by_session(marker: str, temp_dir: str) -> list[psutil.Process]:
    """Live processes this session started (see the module docstring), other than itself."""
    children = {p.pid for p in psutil.Process().children(recursive=True)}
    found = []
    for proc in psutil.process_iter(["pid", "status"]):
        if proc.pid == os.getpid() or proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            if (proc.pid in children or proc.environ().get(SESSION_MARKER) == marker
                    or any(temp_dir in part for part in proc.cmdline())):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def leftovers(marker: str, temp_dir: str, grace: float = 15.0) -> list[str]:
    """Processes of this session still alive after `grace` seconds (shutdowns take a moment)."""
    deadline = time.monotonic() + grace
    while (alive := started_by_session(marker, temp_dir)) and time.monotonic() < deadline:
        time.sleep(0.2)
    described = []
    for proc in alive:
        try:
            described.append(f"pid {proc.pid}: {' '.join(proc.cmdline())[:200]}")
        except psutil.Error:
            continue
    return described


def kill_all(marker: str, temp_dir: str) -> None:
    for proc in started_by_session(marker, temp_dir):
        try:
            proc.kill()
        except psutil.Error:
            continue


