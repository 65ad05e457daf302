"""The OpenAI-compatible HTTP server: a FastAPI app over AsyncLLM, run by uvicorn."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic_core import to_json

from fleetllm import __version__
from fleetllm.config import EngineArgs
from fleetllm.engine.async_llm import AsyncLLM
from fleetllm.engine.core_proc import set_process_name

from .defaults import (
    DEFAULT_MAX_N,
    DEFAULT_MAX_PROMPTS_PER_REQUEST,
    DEFAULT_MAX_REQUEST_BODY_BYTES,
    DEFAULT_SHUTDOWN_TIMEOUT_S,
)
from .elastic import add_elastic_routes
from .errors import OpenAIError
from .lora_routes import LoRAOptions, add_lora_routes, parse_lora_modules
from .metrics import ServerMetrics
from .middleware import APIKeyMiddleware, BodyLimitMiddleware
from .openapi import API_ERRORS, error_responses, install_error_handlers, install_openapi
from .prompts import PromptProcessor
from .protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeChatRequest,
    TokenizeRequest,
    TokenizeResponse,
)
from .serving import OpenAIServing
from .shutdown import (
    GracefulServer,
    Lifecycle,
    LifecycleMiddleware,
    unless_disconnected,
)
from .tools import ToolOptions, template_tools

logger = logging.getLogger(__name__)

ENGINE_DEATH_GRACE_S = 3.0  # how long /health says 503 before a server whose engine died exits
# uvicorn's own shutdown, after ours drained the requests: only idle connections are left.
UVICORN_GRACE_S = 2
DEFAULT_MODEL_NAME = "fleetllm-default"  # the built-in model's name, not its install path


def _sse(chunk: str) -> dict[str, Any]:
    """A stream's events (OpenAPI 3.1: the schema describes one event): each a JSON chunk or
    error, then the closing [DONE]."""
    refs = [{"$ref": f"#/components/schemas/{name}"} for name in (chunk, "ErrorResponse")]
    data = {"anyOf": [{"const": "[DONE]"}, {"contentMediaType": "application/json",
                                             "contentSchema": {"anyOf": refs}}]}
    event = {"type": "object", "required": ["data"], "properties": {"data": data}}
    return {"text/event-stream": {"schema": event}}


@dataclass(frozen=True)
class ServerLimits:
    max_request_body_bytes: int = DEFAULT_MAX_REQUEST_BODY_BYTES
    max_n: int = DEFAULT_MAX_N
    shutdown_timeout_s: float = DEFAULT_SHUTDOWN_TIMEOUT_S
    max_prompts_per_request: int = DEFAULT_MAX_PROMPTS_PER_REQUEST

    @staticmethod
    def from_args(args: argparse.Namespace) -> ServerLimits:
        limits = ServerLimits(args.max_request_body_bytes, args.max_n, args.shutdown_timeout,
                              args.max_prompts_per_request)
        for name, value in (("--max-request-body-bytes", limits.max_request_body_bytes),
                            ("--max-n", limits.max_n),
                            ("--max-prompts-per-request", limits.max_prompts_per_request)):
            if value < 1:
                raise ValueError(f"{name} {value} must be >= 1")
        if limits.shutdown_timeout_s < 0:
            raise ValueError(f"--shutdown-timeout {limits.shutdown_timeout_s} must be >= 0")
        return limits


def _is_builtin(model: str) -> bool:
    from fleetllm.default_model import DEFAULT_MODEL_DIR

    return Path(model).resolve() == DEFAULT_MODEL_DIR


def default_model_names(engine: AsyncLLM) -> list[str]:
    model = engine.config.model_config.model
    return [DEFAULT_MODEL_NAME if _is_builtin(model) else model]


def _respond(result: Any) -> Any:
    if isinstance(result, AsyncIterator):
        return StreamingResponse(result, media_type="text/event-stream")
    return result


def build_app(engine: AsyncLLM, served_model_names: list[str], api_key: str | None = None,
              on_engine_death: Callable[[str], None] | None = None,
              limits: ServerLimits | None = None,
              tool_options: ToolOptions | None = None,
              lora: LoRAOptions | None = None) -> FastAPI:
    """The app owns the engine: it shuts it down when the app's lifespan ends. While an
    engine core that died is restarted, /health stays 200 (streams pause, then go on). If
    the engine dies for good, /health answers 503 for ENGINE_DEATH_GRACE_S (so probes and
    load balancers see it), then on_engine_death(reason) is called: the server uses it to
    stop. app.state.lifecycle is what graceful shutdown drains."""
    limits = limits or ServerLimits()
    metrics = ServerMetrics(engine)
    prompts = PromptProcessor(engine)
    lifecycle = Lifecycle(limits.shutdown_timeout_s)
    serving = OpenAIServing(engine, served_model_names, metrics.track, prompts, limits.max_n,
                            lifecycle.cut, tool_options, limits.max_prompts_per_request)
    model = engine.config.model_config.model
    root = DEFAULT_MODEL_NAME if _is_builtin(model) else model

    async def watch_engine() -> None:
        reason = await engine.wait_until_dead()
        await asyncio.sleep(ENGINE_DEATH_GRACE_S)
        if on_engine_death is not None:
            on_engine_death(reason)

    lora = lora or LoRAOptions()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        watcher = asyncio.create_task(watch_engine())
        try:
            for adapter in lora.modules:  # --lora-modules: a bad one stops the start-up
                try:
                    await engine.add_lora(adapter)
                except (RuntimeError, ValueError) as e:
                    raise RuntimeError(f"--lora-modules {adapter.lora_name}="
                                       f"{adapter.lora_path}: {e}") from e
            yield
        finally:
            watcher.cancel()
            prompts.close()
            engine.shutdown()

    app = FastAPI(title="fleetllm", version=__version__, lifespan=lifespan)
    install_error_handlers(app)
    install_openapi(app, engine.config.model_config.vocab_size, limits.max_n)
    # Outermost last: shutdown's 503 and in-flight count, then the key, then the body cap.
    app.add_middleware(BodyLimitMiddleware, max_bytes=limits.max_request_body_bytes,
                       on_large_body=prompts.release_memory)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    app.add_middleware(LifecycleMiddleware, lifecycle=lifecycle)
    app.state.lifecycle = lifecycle
    _add_routes(app, engine, serving, metrics, served_model_names, root)
    if lora.allow_runtime_updates:
        add_lora_routes(app, engine, served_model_names)
    return app


def _add_routes(app: FastAPI, engine: AsyncLLM, serving: OpenAIServing,
                metrics: ServerMetrics, served_model_names: list[str], root: str) -> None:
    cut = serving.cut
    assert cut is not None

    @app.get("/health", response_class=Response, responses={
        200: {"description": "Serving (or recovering from an engine-core death)",
              "content": {"text/plain": {"schema": {"type": "string", "maxLength": 0}}}},
        **error_responses(503)})
    async def health() -> Response:
        if engine.errored:
            return OpenAIError("the engine is dead", 503, "server_error",
                               code="engine_dead").response()
        hung = engine.hung_reason()
        if hung is not None:  # one step has run longer than execute_model_timeout_s
            return OpenAIError(f"the engine looks hung: {hung}", 503, "server_error",
                               code="engine_hung").response()
        return Response(status_code=200, media_type="text/plain")

    @app.get("/metrics", response_class=Response, responses={
        200: {"description": "Prometheus text format",
              "content": {"text/plain": {"schema": {"type": "string"}}}},
        **error_responses(503)})
    async def prometheus_metrics() -> Response:
        return Response(await metrics.render(), media_type=CONTENT_TYPE_LATEST)

    get_errors = error_responses(401, 503)

    @app.get("/version", responses=get_errors)
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.get("/v1/models", responses=get_errors)
    async def models() -> ModelList:
        cards = [ModelCard(id=name, root=root, max_model_len=engine.max_model_len)
                 for name in served_model_names]
        if engine.config.lora_config is not None:
            cards += [ModelCard(id=lora.lora_name, root=lora.lora_path,
                                parent=served_model_names[0],
                                max_model_len=engine.max_model_len)
                      for lora in await engine.get_lora_requests()]
        return ModelList(data=cards)

    @app.post("/v1/completions", response_model=None, responses={
        200: {"model": CompletionResponse, "content": _sse("CompletionResponse")},
        **API_ERRORS})
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return _respond(await unless_disconnected(request, serving.create_completion(body),
                                                  cut))

    @app.post("/v1/chat/completions", response_model=None, responses={
        200: {"model": ChatCompletionResponse, "content": _sse("ChatCompletionChunk")},
        **API_ERRORS})
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
        return _respond(await unless_disconnected(
            request, serving.create_chat_completion(body), cut))

    @app.post("/tokenize", response_model=TokenizeResponse, responses=API_ERRORS)
    async def tokenize(body: TokenizeRequest) -> Response:
        await serving.resolve_model(body.model)
        if isinstance(body, TokenizeChatRequest):
            tokens = (await serving.chat_prompt(body.messages, body.add_generation_prompt,
                                                body.add_special_tokens, bounded=False,
                                                tools=template_tools(body.tools)))[1]
        else:
            tokens = await serving.prompts.encode(body.prompt, body.add_special_tokens,
                                                  "prompt", bounded=False)
        body = await serving.prompts.run(_tokenize_json, tokens, engine.max_model_len)
        return Response(body, media_type="application/json")

    @app.post("/detokenize", responses=API_ERRORS)
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        await serving.resolve_model(body.model)
        vocab = engine.config.model_config.vocab_size
        bad = [t for t in body.tokens if t >= vocab]
        if bad:
            raise OpenAIError(f"token ids outside [0, {vocab}): {bad[:5]}", param="tokens")
        try:
            return DetokenizeResponse(prompt=engine.decode(body.tokens))
        except ValueError as e:
            raise OpenAIError(str(e), param="tokens") from e


def _tokenize_json(tokens: list[int], max_model_len: int) -> bytes:
    """TokenizeResponse as JSON, written in slices: the GIL is free between them, so the
    event loop answers while millions of ids are written (FastAPI's encoder would take
    seconds, and one pydantic call holds the GIL for all of them)."""
    step = 1 << 17
    ids = b",".join(to_json(tokens[i:i + step])[1:-1] for i in range(0, len(tokens), step))
    return b'{"tokens":[%s],"count":%d,"max_model_len":%d}' % (ids, len(tokens), max_model_len)


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
    if getattr(args, "enable_elastic_ep", False) and args.api_server_count > 1:
        raise ValueError("--enable-elastic-ep needs --api-server-count 1: the API server "
                         "that scales must own the engine cores")
    ServerLimits.from_args(args)  # bad limits fail before anything starts
    ToolOptions.from_args(args)
    lora_options(args)
    if args.api_server_count > 1:
        from .multi_server import run_multi_server

        return run_multi_server(args, engine_kwargs)
    set_process_name("fleetllm-api0")  # as with several servers, so ps reads the same
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


def lora_options(args: argparse.Namespace) -> LoRAOptions:
    modules = tuple(parse_lora_modules(getattr(args, "lora_modules", None)))
    runtime = getattr(args, "allow_runtime_lora_updating", False)
    if (modules or runtime) and not getattr(args, "enable_lora", False):
        raise ValueError("--lora-modules and --allow-runtime-lora-updating need --enable-lora")
    return LoRAOptions(modules, runtime)


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
               log_config: dict[str, Any] | None,
               ignored_signals: frozenset[int] = frozenset()) -> int:
    """Runs uvicorn on sock until a signal (then drains, see shutdown.py) or the engine's
    death; 1 if the engine died."""
    import uvicorn

    names = args.served_model_name or default_model_names(engine)
    died: list[str] = []
    server: GracefulServer | None = None

    def on_engine_death(reason: str) -> None:
        died.append(reason)
        logger.error("stopping the server: %s", reason)
        if server is not None:
            server.should_exit = True

    if not args.api_key and args.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("no --api-key: anyone who can reach %s can use the server", args.host)
    app = build_app(engine, names, args.api_key, on_engine_death, ServerLimits.from_args(args),
                    ToolOptions.from_args(args), lora_options(args))
    if getattr(args, "enable_elastic_ep", False):
        add_elastic_routes(app, engine)
    lifecycle: Lifecycle = app.state.lifecycle
    level = logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower()
    config = uvicorn.Config(app, log_level=level, log_config=log_config,
                            timeout_graceful_shutdown=UVICORN_GRACE_S)
    server = GracefulServer(config, lifecycle, ignored_signals)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 1 if died else 0
