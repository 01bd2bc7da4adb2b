"""How many cores this process may use: the one count that sizes both a worker's encoder streams
(`workers.encoders`) and the share of them each local worker process gets (`producer.services`)."""

from __future__ import annotations

import os


def usable_cores() -> int:
    """The CPUs this process may run on (a container's or taskset's share, not the machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
