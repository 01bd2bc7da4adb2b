"""Setting up a worker process: the one place that touches the process environment.

Every entry point calls `set_up_process` first (`python -m workers`, which `memfleet worker`
runs; `arq workers.WorkerSettings`; the bench; the tests), before mem0 or transformers are
imported, because both read these variables once, at import.
"""

from __future__ import annotations

import os

from workers.settings import WorkerConfig


def set_up_process(config: WorkerConfig | None = None) -> WorkerConfig:
    """Read the worker's settings and prepare the process for them; return the settings."""
    config = config or WorkerConfig()
    # Telemetry is off unless the user opts in; mem0's own files live in our data directory.
    os.environ.setdefault("MEM0_TELEMETRY", "true" if config.telemetry else "false")
    os.environ.setdefault("MEM0_DIR", str(config.data_dir / "mem0"))
    if not config.telemetry:
        # ONNX Runtime (1.29+) sends usage events to Microsoft from Linux too, and writes a device
        # id under ~/.cache, unless this is set before its first session: off unless opted in.
        os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    # The model is the verified copy on disk (workers.model): the Hugging Face hub is never asked.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    return config
