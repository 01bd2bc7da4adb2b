"""memfleet workers: arq job functions running memory jobs through `AsyncScopedMemory`.

`python -m workers` (what `memfleet worker` starts) or `arq workers.WorkerSettings` runs a worker
process. Importing this package changes nothing in the process: see `workers.process`.
"""

from typing import Any

from workers.scoped import AsyncScopedMemory

__all__ = ["AsyncScopedMemory"]


def __getattr__(name: str) -> Any:
    # `arq workers.WorkerSettings` looks the settings up by name: build them then, for the process
    # arq runs, rather than at every import of the package.
    if name == "WorkerSettings":
        from workers.process import set_up_process
        from workers.worker import worker_settings

        return worker_settings(set_up_process())
    raise AttributeError(f"module 'workers' has no attribute {name!r}")
