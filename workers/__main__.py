"""`python -m workers`: one worker process (what `memfleet worker` starts, once per process)."""

import sys

from pydantic import ValidationError

from producer.contract import describe
from workers.arq_worker import FleetWorker
from workers.process import set_up_process
from workers.stopping import ShutdownDeadline, watch_supervisor
from workers.worker import worker_settings

if __name__ == "__main__":
    try:
        config = set_up_process()
    except ValidationError as exc:
        print(f"error: bad setting in the environment: {describe(exc)}", file=sys.stderr)
        sys.exit(2)
    if config.supervisor_pid is not None:
        watch_supervisor(config.supervisor_pid)
    # What `arq workers.WorkerSettings` runs, with the Worker that survives a Redis restart, and
    # exits within MEMFLEET_SHUTDOWN_WAIT of the first SIGTERM whatever its Redis and PostgreSQL do.
    FleetWorker(**worker_settings(config), on_signal=ShutdownDeadline(config.shutdown_wait).arm).run()
