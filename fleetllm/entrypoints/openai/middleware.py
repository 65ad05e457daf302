"""ASGI middleware of the server: the API key, and the request body cap."""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .defaults import DEFAULT_MAX_REQUEST_BODY_BYTES
from .errors import OpenAIError

logger = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/health", "/metrics"})  # probes and scrapers carry no API key
# After a request with a body this large, freed memory is handed back to the OS.
LARGE_BODY_BYTES = 1 << 20


class APIKeyMiddleware:
    """Requires 'Authorization: Bearer KEY' everywhere but the probe paths."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.digest = hashlib.sha256(api_key.encode()).digest()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        auth = Headers(scope=scope).get("authorization", "")
        token = auth[7:] if auth[:7].lower() == "bearer " else ""
        # Comparing fixed-length digests in constant time leaks neither content nor length.
        if hmac.compare_digest(hashlib.sha256(token.encode()).digest(), self.digest):
            await self.app(scope, receive, send)
            return
        error = OpenAIError("missing or incorrect API key; send 'Authorization: Bearer KEY'",
                            401, code="invalid_api_key",
                            headers={"WWW-Authenticate": "Bearer"})
        await error.response()(scope, receive, send)


def _too_large(limit: int, size: int | None) -> OpenAIError:
    seen = f"of {size} bytes" if size is not None else f"over {limit} bytes"
    return OpenAIError(
        f"the request body {seen} is larger than this server accepts ({limit} bytes, "
        "--max-request-body-bytes); send a smaller one", 413, code="request_too_large",
        headers={"Connection": "close"})


class BodyLimitMiddleware:
    """413 for a body over max_bytes before it is read in full: at once when Content-Length
    says so, or as soon as a chunked body passes the limit. The body is read here (so the
    count covers every transfer encoding) and handed to the app as one message. After a
    large one, on_large_body() runs (the server hands freed memory back to the OS)."""

    def __init__(self, app: ASGIApp, max_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES,
                 on_large_body: Callable[[], Awaitable[None]] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.on_large_body = on_large_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            await self._refuse(scope, receive, send, int(length))
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away mid-body: nobody to answer
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                chunks.clear()
                await self._refuse(scope, receive, send, None)
                return
            if not message.get("more_body", False):
                break
        pending: list[Message] = [{"type": "http.request", "body": b"".join(chunks),
                                   "more_body": False}]
        chunks.clear()

        async def replay() -> Message:
            return pending.pop() if pending else await receive()

        try:
            await self.app(scope, replay, send)
        finally:
            pending.clear()
            if size >= LARGE_BODY_BYTES and self.on_large_body is not None:
                await self.on_large_body()

    async def _refuse(self, scope: Scope, receive: Receive, send: Send,
                      size: int | None) -> None:
        logger.info("refused a request body %s (limit %d bytes)",
                    f"of {size} bytes" if size else "over the limit", self.max_bytes)
        await _too_large(self.max_bytes, size).response()(scope, receive, send)
