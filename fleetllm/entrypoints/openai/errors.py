"""The OpenAI error shape, and the exception that carries it through the server."""

from __future__ import annotations

import logging

from fastapi.responses import JSONResponse

from fleetllm.errors import EngineDeadError

from .protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)


def printable(text: str) -> str:
    """text with lone surrogates escaped: a message may quote what the client sent, and a
    surrogate cannot be encoded as UTF-8 (the response would fail as a 500)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class OpenAIError(Exception):
    """An error the client caused (or the engine's death), with its HTTP status."""

    def __init__(self, message: str, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(printable(message))
        self.status, self.type, self.code = status, type, code
        self.param = None if param is None else printable(param)
        self.headers = headers

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorInfo(message=str(self), type=self.type,
                                             param=self.param, code=self.code))

    def response(self) -> JSONResponse:
        return JSONResponse(self.body().model_dump(), status_code=self.status,
                            headers=self.headers)

    @staticmethod
    def from_exception(e: BaseException) -> OpenAIError:
        if isinstance(e, OpenAIError):
            return e
        if isinstance(e, EngineDeadError):
            return OpenAIError(str(e), 503, "server_error", code="engine_dead")
        logger.error("request failed", exc_info=e)
        return OpenAIError(f"internal error: {type(e).__name__}", 500, "server_error")


def shutting_down() -> OpenAIError:
    return OpenAIError("the server is shutting down; retry on another replica", 503,
                       "server_error", code="shutting_down")
