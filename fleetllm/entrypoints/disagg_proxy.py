"""fleetllm proxy: one OpenAI endpoint in front of a prefill server and a decode server.

Each completion goes to the prefill server first, with max_tokens=1 and kv_transfer_params
{"do_remote_decode": true, "transfer_id": T}: it computes the prompt and pushes its KV to
the decode server (P2PZmqConnector). Then the request goes to the decode server with
{"do_remote_prefill": true, "transfer_id": T}, and its answer, streamed or not, goes back
to the client as it comes. A prefill or decode server that cannot be reached gives 503.
"""

from __future__ import annotations

import argparse
import logging
import uuid
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

logger = logging.getLogger(__name__)
_FORWARDED_HEADERS = ("authorization", "x-request-id")


def _unavailable(side: str, url: str, error: Exception) -> JSONResponse:
    message = (f"the {side} server at {url} is unavailable ({type(error).__name__}: {error}); "
               f"check that `fleetllm serve` is running there")
    logger.warning("%s", message)
    return JSONResponse({"error": {"message": message, "type": "ServiceUnavailableError",
                                   "code": 503}}, status_code=503)


def build_app(prefill_url: str, decode_url: str, timeout_s: float = 600.0,
              transport: httpx.AsyncBaseTransport | None = None) -> FastAPI:
    """transport: the upstream connection (tests pass httpx.MockTransport)."""
    prefill_url, decode_url = prefill_url.rstrip("/"), decode_url.rstrip("/")
    clients: dict[str, httpx.AsyncClient] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        clients["http"] = httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=10.0),
                                            transport=transport)
        try:
            yield
        finally:
            await clients.pop("http").aclose()

    app = FastAPI(title="fleetllm disaggregated-prefill proxy", lifespan=lifespan)

    async def forward(request: Request, path: str) -> Response:
        body: dict[str, Any] = await request.json()
        headers = {k: v for k, v in request.headers.items() if k.lower() in _FORWARDED_HEADERS}
        client = clients["http"]
        transfer_id = uuid.uuid4().hex
        prefill = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
        prefill.update(max_tokens=1, kv_transfer_params={"do_remote_decode": True,
                                                         "transfer_id": transfer_id})
        if "max_completion_tokens" in prefill:
            prefill["max_completion_tokens"] = 1
        try:
            first = await client.post(prefill_url + path, json=prefill, headers=headers)
        except httpx.HTTPError as e:
            return _unavailable("prefill", prefill_url, e)
        if first.status_code >= 500:
            return _unavailable("prefill", prefill_url,
                                RuntimeError(f"HTTP {first.status_code}: {first.text[:200]}"))
        if first.status_code != 200:  # the client's own mistake: say it as the server did
            return Response(first.content, first.status_code,
                            media_type=first.headers.get("content-type"))
        decode = dict(body, kv_transfer_params={"do_remote_prefill": True,
                                                "transfer_id": transfer_id})
        try:
            reply = await client.send(client.build_request(
                "POST", decode_url + path, json=decode, headers=headers), stream=True)
        except httpx.HTTPError as e:
            return _unavailable("decode", decode_url, e)
        return StreamingResponse(reply.aiter_bytes(), status_code=reply.status_code,
                                 media_type=reply.headers.get("content-type"),
                                 background=BackgroundTask(reply.aclose))

    async def to_decode(request: Request, path: str) -> Response:
        """Requests that generate nothing go to the decode side as they are."""
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() in (*_FORWARDED_HEADERS, "content-type")}
        try:
            r = await clients["http"].request(request.method, decode_url + path,
                                              content=await request.body(), headers=headers)
        except httpx.HTTPError as e:
            return _unavailable("decode", decode_url, e)
        return Response(r.content, r.status_code, media_type=r.headers.get("content-type"))

    def route(handler: Callable[[Request, str], Awaitable[Response]], path: str
              ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            return await handler(request, path)
        return endpoint

    # Generating requests go through prefill then decode; the rest to the decode side.
    for method, path, handler in (("POST", "/v1/completions", forward),
                                  ("POST", "/v1/chat/completions", forward),
                                  ("GET", "/v1/models", to_decode),
                                  ("POST", "/tokenize", to_decode),
                                  ("POST", "/detokenize", to_decode)):
        app.add_api_route(path, route(handler, path), methods=[method])

    @app.get("/health")
    async def health() -> Response:
        for side, url in (("prefill", prefill_url), ("decode", decode_url)):
            try:
                r = await clients["http"].get(url + "/health")
                r.raise_for_status()
            except httpx.HTTPError as e:
                return _unavailable(side, url, e)
        return Response(status_code=200)

    return app


def add_proxy_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prefill", required=True, help="the prefill server's URL "
                   "(fleetllm serve with kv_role kv_producer)")
    p.add_argument("--decode", required=True, help="the decode server's URL "
                   "(fleetllm serve with kv_role kv_consumer)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="port to listen on")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds one upstream request may take")


def run_proxy(a: argparse.Namespace) -> int:
    import uvicorn

    uvicorn.run(build_app(a.prefill, a.decode, a.timeout), host=a.host, port=a.port,
                log_level="warning")
    return 0
