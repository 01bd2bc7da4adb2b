"""`python -m workers`: one worker process (what `memfleet worker` starts, once per process)."""

from producer.arq_adapter import FleetWorker
from workers.process import set_up_process
from workers.worker import worker_settings

if __name__ == "__main__":
    # What `arq workers.WorkerSettings` runs, with the Worker that survives a Redis restart.
    FleetWorker(**worker_settings(set_up_process())).run()
