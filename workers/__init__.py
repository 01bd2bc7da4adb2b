"""memfleet workers: arq job functions running memory jobs through `AsyncScopedMemory`.

`arq workers.WorkerSettings` runs a worker process.
"""

import os

from workers.settings import WorkerConfig

# mem0 reads these once, when it is first imported: decide them before that can happen.
# Telemetry is off unless the user opts in; mem0's own files live in our data directory.
_config = WorkerConfig()
os.environ.setdefault("MEM0_TELEMETRY", "true" if _config.telemetry else "false")
os.environ.setdefault("MEM0_DIR", str(_config.data_dir / "mem0"))

from workers.scoped import AsyncScopedMemory  # noqa: E402
from workers.worker import WorkerSettings  # noqa: E402

__all__ = ["AsyncScopedMemory", "WorkerSettings"]
