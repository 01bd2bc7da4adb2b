"""How a worker process stops: within its shutdown wait, whatever Redis and PostgreSQL are doing,
and by itself when the `memfleet worker` that started it is gone.

arq's own shutdown waits a bounded time for running jobs, but then closes its Redis connection and
runs the shutdown hook, and neither is bounded: with Redis down, every command there is retried
for minutes (`producer.redis_pool`), and a PostgreSQL call stuck in a thread cannot be cancelled at
all. So the first SIGTERM or SIGINT also starts a clock (`ShutdownDeadline`), and a process still
alive when it runs out exits at once, with `OVERRUN_EXIT_CODE`. What it abandons is what a
`kill -9` abandons: its jobs are run again by arq, its writes re-applied from the write logs.

A supervised worker also watches its supervisor (`watch_supervisor`): a parent that died without
passing on a signal (`kill -9`, OOM) leaves no one to stop the worker, which then stops itself.
The watch polls the parent's pid rather than using Linux's PR_SET_PDEATHSIG, which fires when the
*thread* that started the child ends, not the process, and is Linux only.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import structlog

log = structlog.get_logger("memfleet.worker")

OVERRUN_EXIT_CODE = 70  # EX_SOFTWARE: the clean shutdown did not finish in time
SUPERVISOR_POLL = 0.5


class ShutdownDeadline:
    """Exits the process `wait` seconds after the first `arm()`, unless it exited before."""

    def __init__(self, wait: float) -> None:
        self.wait = wait
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()

    def arm(self, signum: int | None = None) -> None:
        with self._lock:
            if self._timer is not None:
                return  # the first signal started the clock; later ones do not restart it
            self._timer = threading.Timer(self.wait, self._overrun, args=(signum, time.monotonic()))
            self._timer.daemon = True
            self._timer.start()

    def _overrun(self, signum: int | None, since: float) -> None:
        log.error("shutdown_overrun", waited_seconds=round(time.monotonic() - since, 1), wait_seconds=self.wait,
                  signal=signal.Signals(signum).name if signum else None, exit_code=OVERRUN_EXIT_CODE)
        sys.stderr.flush()
        os._exit(OVERRUN_EXIT_CODE)


def watch_supervisor(supervisor_pid: int) -> threading.Thread:
    """SIGTERM this process once its parent is no longer `supervisor_pid` (the parent died; the
    process was re-parented). If that happened before the watch began, at once."""

    def watch() -> None:
        while os.getppid() == supervisor_pid:
            time.sleep(SUPERVISOR_POLL)
        log.warning("supervisor_gone", supervisor_pid=supervisor_pid, pid=os.getpid())
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=watch, name="supervisor-watch", daemon=True)
    thread.start()
    return thread
