"""Bulk ingestion as a stream: lines → validated entries (`inputs`) → per-user batches
(`batching`) → add requests submitted as they come (`run`).

Nothing holds a whole file. `read_entries` yields one validated message (or one error naming its
file and line) at a time; `group` buffers at most a window of messages and turns each user's run
of messages, in file order, into add requests; `Ingest.run` submits those in chunks as they come
and, with `wait`, keeps only a bounded window of outstanding writes. Memory is set by the window
and the chunk sizes, not by the input.
"""

from producer.ingest.batching import JOB_SIZE, batches, group
from producer.ingest.inputs import STDIN, Entry, Format, Input, LineError, read_entries, read_locomo, read_messages
from producer.ingest.run import WAIT_WINDOW, Ingest, Tally

__all__ = ["JOB_SIZE", "STDIN", "WAIT_WINDOW", "Entry", "Format", "Ingest", "Input", "LineError", "Tally", "batches",
           "group", "read_entries", "read_locomo", "read_messages"]
