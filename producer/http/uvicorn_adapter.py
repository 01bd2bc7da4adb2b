"""What `memfleet serve` takes from uvicorn beyond its settings: a deadline for a request's head.

uvicorn times out an idle keep-alive connection, but not a request whose head arrives slowly, or
a connection that sends a few bytes and then nothing: each holds one of `limit_concurrency`'s
places for as long as the client likes (slowloris). `HeadDeadline` is uvicorn's own h11 protocol
with one timer more: from the moment a connection opens, or a response on it ends, the next
request's head must be complete within `head_timeout` seconds, or the connection is closed.

It relies on three things of `uvicorn.protocols.http.h11_impl.H11Protocol` (uvicorn 0.30 to 0.55
at least): `handle_events` starts a new `cycle` when a request's head has been read,
`on_response_complete` runs when a response ends, and `cycle.response_complete` says whether the
current one has. tests/test_frontdoor.py holds it to that with a real server and raw sockets.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol


class HeadDeadline(H11Protocol):
    head_timeout: float = 10.0
    _head_timer: asyncio.TimerHandle | None = None

    @classmethod
    def with_timeout(cls, seconds: float) -> type[HeadDeadline]:
        """The protocol class to give uvicorn (`http=`), which builds one per connection itself."""
        return type(cls.__name__, (cls,), {"head_timeout": seconds})

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a request's head was read
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_too_slow)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self.cycle is None or self.cycle.response_complete:  # still no request being served
            self.transport.close()
