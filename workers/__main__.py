"""`python -m workers`: one worker process (what `memfleet worker` starts, once per process)."""

from arq.worker import get_kwargs

from workers import WorkerSettings
from workers.worker import FleetWorker

if __name__ == "__main__":
    # What `arq workers.WorkerSettings` runs, with the Worker that survives a Redis restart.
    FleetWorker(**get_kwargs(WorkerSettings)).run()  # type: ignore[arg-type]
