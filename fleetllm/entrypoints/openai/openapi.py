"""What the OpenAPI schema says about errors, and how request validation errors read."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from fleetllm.errors import EngineDeadError

from .errors import OpenAIError
from .protocol import INT64_END, ChatCompletionChunk, ErrorResponse

_ERRORS = {
    400: "Invalid request: a field's type or range, an unknown or unsupported field, a prompt "
         "that does not fit",
    401: "Missing or incorrect API key (when the server has one)",
    404: "Unknown model",
    413: "Request body larger than --max-request-body-bytes",
    503: "The server is shutting down, or its engine is dead",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {s: {"model": ErrorResponse, "description": _ERRORS[s]} for s in statuses}


API_ERRORS = error_responses(400, 401, 404, 413, 503)


def _this_server(node: Any, vocab_size: int, max_n: int) -> None:
    """Writes this server's own limits into the request schemas: token ids (the only
    integers in [0, 2**63)) below the vocabulary size, n up to --max-n."""
    if isinstance(node, list):
        for v in node:
            _this_server(v, vocab_size, max_n)
        return
    if not isinstance(node, dict):
        return
    if node.get("minimum") == 0 and node.get("exclusiveMaximum") == INT64_END:
        del node["exclusiveMaximum"]
        node["maximum"] = vocab_size - 1
    n = node.get("properties", {}).get("n")
    if isinstance(n, dict) and "maximum" in n:
        n["maximum"] = max_n
    for v in node.values():
        _this_server(v, vocab_size, max_n)


def _add_models(components: dict[str, Any], models: tuple[type[BaseModel], ...]) -> None:
    """Models only streams refer to (FastAPI adds those of bodies and responses)."""
    for model in models:
        schema = model.model_json_schema(mode="serialization",
                                         ref_template="#/components/schemas/{model}")
        for name, sub in schema.pop("$defs", {}).items():
            components.setdefault(name, sub)
        components.setdefault(model.__name__, schema)


def install_openapi(app: FastAPI, vocab_size: int, max_n: int) -> None:
    """The schema with this server's limits and its stream chunks, and without FastAPI's
    422 (this server answers 400 in the OpenAI shape)."""
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            _add_models(components, (ChatCompletionChunk,))
            for name in ("HTTPValidationError", "ValidationError"):
                components.pop(name, None)
            _this_server(components, vocab_size, max_n)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


def _path(loc: tuple[Any, ...]) -> str:
    # Drops "body" and the names pydantic gives union branches: str, list[int], ..., and
    # a message's role after its index.
    parts: list[str] = []
    for i, p in enumerate(loc):
        tag = p in ("body", "str") or "[" in str(p)
        if not tag and not (p in ROLES and i > 0 and isinstance(loc[i - 1], int)):
            parts.append(str(p))
    return ".".join(parts)


def _describe(error: dict[str, Any]) -> tuple[str, str | None]:
    """(message, param) for one pydantic error."""
    kind, path = error.get("type"), _path(error.get("loc", ()))
    ctx = error.get("ctx") or {}
    if kind == "not_supported" and "field" in ctx:
        return str(error.get("msg")), ctx["field"]
    if kind == "extra_forbidden":
        return f"{path}: unknown field; this server does not support it (remove it)", path
    return f"{path or 'body'}: {error.get('msg')}", path or None


def validation_error(exc: RequestValidationError) -> OpenAIError:
    errors = list(exc.errors())
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        return OpenAIError(f"the request body is not valid JSON: {detail}")
    described = [_describe(e) for e in errors[:5]]
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    message = "; ".join(m for m, _ in described) + more
    return OpenAIError(message or "invalid request", param=described[0][1] if described else None)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def on_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(HTTPException)
    async def on_http(_: Request, exc: HTTPException) -> JSONResponse:
        kind = "not_found" if exc.status_code == 404 else "invalid_request_error"
        # Keeps the headers: a 405 carries Allow.
        return OpenAIError(str(exc.detail), exc.status_code, kind,
                           headers=dict(exc.headers or {})).response()

    # Handled here, these are not re-raised to uvicorn as unhandled errors would be.
    @app.exception_handler(OpenAIError)
    @app.exception_handler(EngineDeadError)
    async def on_known(_: Request, exc: Exception) -> JSONResponse:
        return OpenAIError.from_exception(exc).response()

    @app.exception_handler(Exception)
    async def on_error(_: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises the exception after this response, and uvicorn logs it.
        return OpenAIError(f"internal error: {type(exc).__name__}", 500,
                           "server_error").response()
