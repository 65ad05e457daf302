"""Graceful shutdown: on SIGTERM the server answers new requests with 503, lets the ones in
flight finish for up to --shutdown-timeout seconds, then ends the rest (a stream with an
error event and [DONE], any other request with a 503 body), and only then stops uvicorn.

uvicorn's own graceful shutdown cannot do this: it closes the listening socket first (new
clients are refused, not told 503) and, past its timeout, cancels the requests' tasks, which
cuts streams without an error event or [DONE]."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable
from types import FrameType
from typing import Any

import uvicorn
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import shutting_down

logger = logging.getLogger(__name__)

# How long the requests that were cut get to send their last bytes.
CUT_GRACE_S = 3.0
UNCOUNTED_PATHS = frozenset({"/health", "/metrics"})  # probes do not hold a shutdown up


class Lifecycle:
    """The server's in-flight requests and its shutdown state."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.draining = False
        self.cut = asyncio.Event()  # set: requests still running must end now
        self.active = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.active += 1
        self._idle.clear()

    def leave(self) -> None:
        self.active -= 1
        if self.active == 0:
            self._idle.set()

    async def drain(self) -> None:
        """Returns once no request is in flight: after they finished, or were cut."""
        self.draining = True
        logger.info("shutting down: %d request(s) in flight get up to %.0f s to finish",
                    self.active, self.timeout_s)
        if not await self._wait_idle(self.timeout_s):
            logger.warning("ending %d request(s) still running after %.0f s", self.active,
                           self.timeout_s)
            self.cut.set()
            if not await self._wait_idle(CUT_GRACE_S):
                logger.warning("%d request(s) did not end in time", self.active)

    async def _wait_idle(self, timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
            return True
        except asyncio.TimeoutError:
            return False


class LifecycleMiddleware:
    """Counts the requests in flight, and answers 503 once the server is draining."""

    def __init__(self, app: ASGIApp, lifecycle: Lifecycle) -> None:
        self.app = app
        self.lifecycle = lifecycle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.lifecycle.draining and scope["path"] != "/metrics":
            await shutting_down().response()(scope, receive, send)
            return
        if scope["path"] in UNCOUNTED_PATHS:
            await self.app(scope, receive, send)
            return
        self.lifecycle.enter()
        try:
            await self.app(scope, receive, send)
        finally:
            self.lifecycle.leave()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[Any],
                              cut: asyncio.Event) -> Any:
    """Runs work, cancelling it (and so aborting its requests) if the client goes away, or
    answering 503 if the server's shutdown cuts it."""
    task = asyncio.ensure_future(work)
    watchers = {asyncio.ensure_future(_disconnected(request)),
                asyncio.ensure_future(cut.wait())}
    try:
        await asyncio.wait({task, *watchers}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in watchers:
            w.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    if task.cancelled():
        if cut.is_set():
            return shutting_down().response()
        return Response(status_code=499)  # nobody reads it; the client is gone
    return task.result()


class GracefulServer(uvicorn.Server):
    """uvicorn, with SIGTERM (and SIGINT unless ignored) starting Lifecycle.drain(); a second
    signal ends the requests in flight at once."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle,
                 ignored_signals: frozenset[int] = frozenset()) -> None:
        super().__init__(config)
        self.lifecycle = lifecycle
        self.ignored_signals = ignored_signals
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Task[None] | None = None

    async def startup(self, sockets: Any = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig in self.ignored_signals:
            return
        if self._loop is None or self._loop.is_closed():
            super().handle_exit(sig, frame)  # not serving yet: nothing to drain
            return
        if self.lifecycle.draining:
            logger.info("second signal: ending the requests in flight now")
            self._loop.call_soon_threadsafe(self.lifecycle.cut.set)
            return
        self._captured_signals.append(sig)  # re-raised once uvicorn has stopped
        self.lifecycle.draining = True
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self._drain = asyncio.ensure_future(self.lifecycle.drain())
        self._drain.add_done_callback(lambda _: setattr(self, "should_exit", True))


IGNORE_SIGINT = frozenset({signal.SIGINT})
