"""The OpenAI-compatible HTTP server: a FastAPI app over AsyncLLM, run by uvicorn."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import logging
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from fleetllm import __version__
from fleetllm.config import EngineArgs
from fleetllm.engine.async_llm import AsyncLLM
from fleetllm.errors import EngineDeadError, EngineRestartingError

from .protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from .serving import OpenAIError, OpenAIServing, Stream

logger = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/health", "/metrics"})  # probes and scrapers carry no API key
GRACEFUL_SHUTDOWN_S = 5
ENGINE_DEATH_GRACE_S = 3.0  # how long /health says 503 before a server whose engine died exits
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                   60.0)
# The scheduler's stats, as (name, help, stats key); gauges, then counters.
ENGINE_GAUGES = (
    ("fleetllm:num_requests_running", "Requests the scheduler is running.", "num_running"),
    ("fleetllm:num_requests_waiting", "Requests waiting to be scheduled.", "num_waiting"),
    ("fleetllm:kv_cache_usage_perc", "Fraction of KV cache blocks in use (1 = full).",
     "kv_cache_usage"),
)
ENGINE_COUNTERS = (
    ("fleetllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
     "prefix_cache_queries"),
    ("fleetllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
     "prefix_cache_hits"),
    ("fleetllm:num_preemptions", "Requests preempted for lack of KV cache.", "num_preemptions"),
)


class _EngineStats(Collector):
    """Exports the engines' last reported scheduler stats, one sample per engine, and the
    restarts: of engine cores, as this front end saw them (every API server hears of every
    one, so any server's count is the total), and of workers, summed over the engines (a
    restarted engine core starts from 0, which Prometheus reads as a counter reset)."""

    def __init__(self, engine: AsyncLLM) -> None:
        self.engine = engine
        self.per_engine: list[dict[str, float]] = []

    def collect(self) -> Iterator[Metric]:
        for kinds, family in ((ENGINE_GAUGES, GaugeMetricFamily),
                              (ENGINE_COUNTERS, CounterMetricFamily)):
            for name, doc, key in kinds:
                metric = family(name, doc, labels=["engine"])
                for i, stats in enumerate(self.per_engine):
                    metric.add_metric([str(i)], stats.get(key, 0.0))
                yield metric
        yield CounterMetricFamily("fleetllm:engine_restarts",
                                  "Engine cores that died and were restarted.",
                                  value=self.engine.num_engine_restarts)
        yield CounterMetricFamily(
            "fleetllm:worker_restarts", "Workers restarted inside the engine cores.",
            value=sum(s.get("num_worker_restarts", 0.0) for s in self.per_engine))
        yield CounterMetricFamily(
            "fleetllm:requests_recomputed",
            "Requests put back and recomputed inside an engine core after its workers "
            "were restarted.",
            value=sum(s.get("num_requests_recomputed", 0.0) for s in self.per_engine))


class ServerMetrics:
    """Prometheus metrics on the app's own registry, so two apps in a process never clash."""

    def __init__(self, engine: AsyncLLM) -> None:
        self.engine = engine
        self.registry = CollectorRegistry()
        self.engine_stats = _EngineStats(engine)
        self.registry.register(self.engine_stats)
        r = self.registry
        # A multiprocess counter: with several API servers, each re-sends its own requests.
        self.requests_recovered = Counter(
            "fleetllm:requests_recovered",
            "Unfinished requests re-sent to a live engine after their engine core died.",
            registry=r)
        engine.on_requests_recovered(self.requests_recovered.inc)
        self.prompt_tokens = Counter("fleetllm:prompt_tokens", "Prefilled prompt tokens.",
                                     registry=r)
        self.generation_tokens = Counter("fleetllm:generation_tokens", "Generated tokens.",
                                         registry=r)
        self.ttft = Histogram("fleetllm:time_to_first_token_seconds",
                              "Time from arrival to the first token.",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("fleetllm:inter_token_latency_seconds",
                             "Time between successive outputs of a request.",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("fleetllm:e2e_request_latency_seconds",
                             "Time from arrival to the finished output.",
                             buckets=LATENCY_BUCKETS, registry=r)

    async def track(self, stream: Stream, prompt_len: int) -> Stream:
        start = last = time.monotonic()
        seen = 0
        async for out in stream:
            now = time.monotonic()
            total = sum(len(o.token_ids) for o in out.outputs)
            if total > seen:
                if seen == 0:
                    self.ttft.observe(now - start)
                    self.prompt_tokens.inc(prompt_len)
                else:
                    self.itl.observe(now - last)
                self.generation_tokens.inc(total - seen)
                seen, last = total, now
            if out.finished:
                self.e2e.observe(now - start)
            yield out

    async def render(self) -> bytes:
        if not self.engine.errored:
            try:
                self.engine_stats.per_engine = await self.engine.get_stats()
            except (EngineDeadError, EngineRestartingError):
                pass  # keep the last numbers; /health reports a death
        if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
            return generate_latest(self.registry)
        # Several API server processes: any of them answers a scrape with the sum of all.
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        registry.register(self.engine_stats)
        return generate_latest(registry)


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
                            401, code="invalid_api_key")
        await _error_response(error)(scope, receive, send)


def _error_response(e: OpenAIError) -> JSONResponse:
    return JSONResponse(e.body().model_dump(), status_code=e.status)


def _validation_error(exc: RequestValidationError) -> OpenAIError:
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return OpenAIError(f"the request body is not valid JSON: {detail}")
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    messages = "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
        for e in errors)
    return OpenAIError(messages or "invalid request", param=loc[0] if loc else None)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def on_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(_validation_error(exc))

    @app.exception_handler(HTTPException)
    async def on_http(_: Request, exc: HTTPException) -> JSONResponse:
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        return _error_response(OpenAIError(str(exc.detail), exc.status_code, kind))

    # Handled here, these are not re-raised to uvicorn as unhandled errors would be.
    @app.exception_handler(OpenAIError)
    @app.exception_handler(EngineDeadError)
    async def on_known(_: Request, exc: Exception) -> JSONResponse:
        return _error_response(OpenAIError.from_exception(exc))

    @app.exception_handler(Exception)
    async def on_error(_: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises the exception after this response, and uvicorn logs it.
        return _error_response(OpenAIError(f"internal error: {type(exc).__name__}", 500,
                                           "server_error"))


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """Runs work, cancelling it (and so aborting its requests) if the client goes away."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if not task.done() or task.cancelled():
        return Response(status_code=499)  # nobody reads it; the client is gone
    return task.result()


def _respond(result: Any) -> Any:
    if isinstance(result, AsyncIterator):
        return StreamingResponse(result, media_type="text/event-stream")
    return result


def build_app(engine: AsyncLLM, served_model_names: list[str], api_key: str | None = None,
              on_engine_death: Callable[[str], None] | None = None) -> FastAPI:
    """The app owns the engine: it shuts it down when the app's lifespan ends. While an
    engine core that died is restarted, /health stays 200 (streams pause, then go on). If
    the engine dies for good, /health answers 503 for ENGINE_DEATH_GRACE_S (so probes and
    load balancers see it), then on_engine_death(reason) is called: the server uses it to
    stop."""
    metrics = ServerMetrics(engine)
    serving = OpenAIServing(engine, served_model_names, metrics.track)

    async def watch_engine() -> None:
        reason = await engine.wait_until_dead()
        await asyncio.sleep(ENGINE_DEATH_GRACE_S)
        if on_engine_death is not None:
            on_engine_death(reason)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        watcher = asyncio.create_task(watch_engine())
        try:
            yield
        finally:
            watcher.cancel()
            engine.shutdown()

    app = FastAPI(title="fleetllm", version=__version__, lifespan=lifespan)
    _install_error_handlers(app)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)

    @app.get("/health")
    async def health() -> Response:
        if engine.errored:
            return _error_response(OpenAIError("the engine is dead", 503, "server_error",
                                               code="engine_dead"))
        return Response(status_code=200)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(await metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=name, root=engine.config.model_config.model,
                                         max_model_len=engine.max_model_len)
                               for name in served_model_names])

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return _respond(await _unless_disconnected(request, serving.create_completion(body)))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        return _respond(await _unless_disconnected(request,
                                                   serving.create_chat_completion(body)))

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        serving.check_model(body.model)
        if body.messages is not None:
            tokens = serving.chat_prompt(body.messages, body.add_generation_prompt)[1]
        else:
            try:
                tokens = engine.encode(body.prompt, body.add_special_tokens)
            except ValueError as e:
                raise OpenAIError(str(e), param="prompt") from e
        return TokenizeResponse(tokens=tokens, count=len(tokens),
                                max_model_len=engine.max_model_len)

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        serving.check_model(body.model)
        vocab = engine.config.model_config.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise OpenAIError(f"token ids outside [0, {vocab}): {bad[:5]}", param="tokens")
        try:
            return DetokenizeResponse(prompt=engine.decode(body.tokens))
        except ValueError as e:
            raise OpenAIError(str(e), param="tokens") from e

    return app


class _Stopped(BaseException):
    """SIGTERM outside uvicorn's own handling (start-up, or re-raised after it stops); a
    BaseException, like KeyboardInterrupt, so no `except Exception` swallows it."""


def _raise_stopped(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup
    raise _Stopped


def run_server(args: argparse.Namespace, engine_kwargs: dict[str, Any]) -> int:
    """`fleetllm serve`: one HTTP server process owning its engine cores, or, with
    --api-server-count > 1, a supervisor over API server processes and engine cores."""
    if args.api_server_count < 1:
        raise ValueError(f"--api-server-count {args.api_server_count} must be >= 1")
    if args.api_server_count > 1:
        from .multi_server import run_multi_server

        return run_multi_server(args, engine_kwargs)
    # Python's default SIGTERM would skip the finally below and orphan the engine processes.
    signal.signal(signal.SIGTERM, _raise_stopped)
    engine: AsyncLLM | None = None
    try:
        sock = listen_socket(args.host, args.port)
        engine = AsyncLLM.from_engine_args(EngineArgs(**engine_kwargs), args.data_parallel_size,
                                           args.data_parallel_backend)
        # ray.init installs its own SIGTERM handler, which aborts the process without the
        # cleanup below: put ours back.
        signal.signal(signal.SIGTERM, _raise_stopped)
        return serve_http(engine, args, sock, log_config=uvicorn_log_config())
    except (_Stopped, KeyboardInterrupt):
        logger.info("stopped by a signal")
        return 0
    finally:
        if engine is not None:
            engine.shutdown()


def listen_socket(host: str, port: int) -> socket.socket:
    """Binds the server's address before the engines start, so a taken port fails fast."""
    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("listening on %s: reachable from other machines", host)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise RuntimeError(f"cannot listen on {host}:{port} ({e.strerror}); choose another "
                           "--port or --host") from None
    sock.listen(2048)
    return sock


def uvicorn_log_config() -> dict[str, Any] | None:
    import uvicorn.config

    return uvicorn.config.LOGGING_CONFIG


def serve_http(engine: AsyncLLM, args: argparse.Namespace, sock: socket.socket,
               log_config: dict[str, Any] | None) -> int:
    """Runs uvicorn on sock until a signal or the engine's death; 1 if the engine died."""
    import uvicorn

    names = args.served_model_name or [engine.config.model_config.model]
    died: list[str] = []
    server: uvicorn.Server | None = None

    def on_engine_death(reason: str) -> None:
        died.append(reason)
        logger.error("stopping the server: %s", reason)
        if server is not None:
            server.should_exit = True

    if not args.api_key and args.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("no --api-key: anyone who can reach %s can use the server", args.host)
    app = build_app(engine, names, args.api_key, on_engine_death)
    level = logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower()
    config = uvicorn.Config(app, log_level=level, log_config=log_config,
                            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 1 if died else 0
