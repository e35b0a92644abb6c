"""Time limits on what a client owes the server: a request's headers, then its body.

uvicorn limits only the idle time between requests. A client that opens a connection and
sends half a header, or declares a 60 MiB upload and stops after the first megabytes,
would otherwise hold its socket (and the body read so far) until it goes away by itself.
Here the whole header must arrive within HEADER_SECONDS, and a body may pause for at most
BODY_IDLE_SECONDS while the server is waiting for it; past either, the connection is
closed and the request handler sees a disconnect, which frees what it held.

A request whose connection goes is handed the body that had arrived before its
disconnect, not only the disconnect: an upload keeps every chunk that came whole before a
link went down (services/sync.py: BundleIntake).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from uvicorn._types import ASGI3Application, ASGIReceiveEvent
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

HEADER_SECONDS = 20.0
BODY_IDLE_SECONDS = 30.0


class BodyFirstCycle(RequestResponseCycle):
    """uvicorn drops the body bytes it holds, not yet read by the handler, when the
    connection is lost (up to 64 KiB). This cycle hands them on first, as more body, and
    only then the disconnect: what the client sent before a cut is what the server had."""

    async def receive(self) -> ASGIReceiveEvent:
        message = await super().receive()
        if message["type"] == "http.disconnect" and self.body and not self.response_complete:
            body, self.body = bytes(self.body), bytearray()
            return {"type": "http.request", "body": body, "more_body": True}
        return message


class TimedHttpProtocol(HttpToolsProtocol):
    header_seconds = HEADER_SECONDS
    body_idle_seconds = BODY_IDLE_SECONDS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._waiting_for = ""  # "header", "body" or "" (nothing owed by the client)
        self._last_piece = 0.0

    # -- the two phases ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._expect("header", self.header_seconds)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._waiting_for != "header":  # a next request on a kept-alive connection
            self._expect("header", self.header_seconds)

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._last_piece = time.monotonic()
        self._expect("body", self.body_idle_seconds)

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        cycle.__class__ = BodyFirstCycle  # before its task runs: it has read nothing yet
        super()._start_asgi_task(cycle, app)

    def on_body(self, body: bytes) -> None:
        self._last_piece = time.monotonic()  # the timer checks this when it fires
        super().on_body(body)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._expect("", 0)

    def connection_lost(self, exc: Exception | None) -> None:
        self._expect("", 0)
        super().connection_lost(exc)

    # -- the timer --------------------------------------------------------------------------
    def _expect(self, what: str, seconds: float) -> None:
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
            self._deadline_timer = None
        self._waiting_for = what
        if what:
            self._deadline_timer = self.loop.call_later(seconds, self._deadline_passed)

    def _deadline_passed(self) -> None:
        self._deadline_timer = None
        if self.transport is None or self.transport.is_closing():
            return
        if self._waiting_for == "body":
            idle = time.monotonic() - self._last_piece
            # Reading paused by the server itself (the handler is slow to take the body)
            # is not the client's delay.
            # Nor is a client that waits for our "100 Continue" before it sends the body.
            waiting_for_us = self.cycle is not None and self.cycle.waiting_for_100_continue
            if self.flow.read_paused or waiting_for_us:
                self._last_piece = time.monotonic()
                idle = 0.0
            if idle < self.body_idle_seconds:
                self._deadline_timer = self.loop.call_later(
                    max(self.body_idle_seconds - idle, 1.0), self._deadline_passed)
                return
        self.logger.info("closing a connection from %s: its request %s did not arrive in "
                         "time", self.client[0] if self.client else "?", self._waiting_for)
        self.transport.close()


def timed_protocol(header_seconds: float, body_idle_seconds: float) -> type[TimedHttpProtocol]:
    """The protocol class uvicorn is given, with these limits."""
    return type("TimedHttpProtocol", (TimedHttpProtocol,),
                {"header_seconds": header_seconds, "body_idle_seconds": body_idle_seconds})
