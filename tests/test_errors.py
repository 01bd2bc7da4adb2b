"""The error tree (producer/errors.py) as API callers meet it."""

from __future__ import annotations

from typing import Any

import pytest
from arq.connections import ArqRedis

from producer.client import Memfleet
from producer.errors import InvalidRequest, MemfleetError, NoWorkerError, WriteTimeout
from producer.services import RedisServer
from producer.settings import ProducerSettings

BAD_CALLS: dict[str, tuple[str, dict[str, Any], str]] = {
    "empty user id": ("add", {"user_id": "", "messages": ["hi"]}, "user_id"),
    "content too long": ("add", {"user_id": "alice", "messages": ["x" * 20_000]}, "messages.0.content"),
    "no messages": ("add", {"user_id": "alice", "messages": []}, "messages"),
    "reserved metadata key": ("add", {"user_id": "alice", "messages": ["hi"], "metadata": {"user_id": "bob"}},
                              "metadata"),
    "search limit zero": ("search", {"user_id": "alice", "query": "q", "limit": 0}, "limit"),
    "filter naming another user": ("search", {"user_id": "alice", "query": "q", "filters": {"user_id": "bob"}},
                                   "filters"),
    "page size too large": ("list", {"user_id": "alice", "limit": 10**6}, "limit"),
    "forget of a wildcard": ("forget", {"user_id": "*"}, "user_id"),
}


@pytest.mark.parametrize("call", BAD_CALLS.values(), ids=list(BAD_CALLS))
async def test_bad_input_is_a_memfleet_error_naming_the_field(call: tuple[str, dict[str, Any], str]) -> None:
    method, arguments, field = call
    # Input is checked before anything is sent: this client's Redis is never contacted.
    fleet = Memfleet(ArqRedis(), ProducerSettings())
    user_id = arguments.pop("user_id")
    with pytest.raises(InvalidRequest, match=field.replace(".", r"\.")) as raised:
        if method == "add":
            await fleet.add(user_id, arguments.pop("messages"), **arguments)
        else:
            await getattr(fleet, method)(user_id, **arguments)
    assert isinstance(raised.value, ValueError) and isinstance(raised.value, MemfleetError)


async def test_a_slow_write_is_a_write_timeout_not_a_missing_worker() -> None:
    server = RedisServer().start()
    try:
        async with await Memfleet.connect(ProducerSettings(redis_url=server.url)) as fleet:
            handle = await fleet.add("alice", ["accepted, but no worker applies it"])
            with pytest.raises(WriteTimeout, match="stay queued") as raised:
                await handle.outcome(timeout=0.2)
            assert not isinstance(raised.value, NoWorkerError)
    finally:
        server.stop()


def test_every_exception_memfleet_defines_is_in_the_one_tree() -> None:
    """Each is a `MemfleetError`, and producer/errors.py draws it in its tree."""
    import importlib
    import inspect
    import pkgutil

    import producer
    import producer.errors
    import workers

    defined = []
    for package in (producer, workers):
        for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            if info.name.endswith("__main__"):
                continue
            module = importlib.import_module(info.name)
            defined += [cls for _, cls in inspect.getmembers(module, inspect.isclass)
                        if issubclass(cls, BaseException) and cls.__module__ == info.name]
    assert len(defined) > 20, "the walk finds memfleet's exceptions"
    outside = sorted(cls.__qualname__ for cls in defined if not issubclass(cls, MemfleetError))
    assert outside == []
    tree = producer.errors.__doc__ or ""
    undrawn = sorted(c.__qualname__ for c in defined if c is not MemfleetError and f"── {c.__name__} " not in tree)
    assert undrawn == []
