"""`python -m workers`: one worker process (what `memfleet worker` starts, once per process)."""

from arq.worker import run_worker

from workers import WorkerSettings

if __name__ == "__main__":
    run_worker(WorkerSettings)  # type: ignore[arg-type]
