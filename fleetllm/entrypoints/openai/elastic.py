"""Elastic data parallel over HTTP, with vLLM's routes and fields: POST /scale_elastic_ep
grows or shrinks the fleet of engine cores while it serves, GET /is_scaling_elastic_ep says
whether a scale is under way. Only with `serve --enable-elastic-ep`."""

from __future__ import annotations

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field

from fleetllm.engine.async_llm import AsyncLLM
from fleetllm.engine.client import DRAIN_TIMEOUT_S, MAX_DATA_PARALLEL_SIZE, SCALE_TIMEOUT_S
from fleetllm.errors import ScaleError, ScaleInProgressError

from .errors import OpenAIError
from .openapi import error_responses
from .protocol import ErrorResponse


class ScaleElasticEPRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    new_data_parallel_size: int = Field(ge=1, le=MAX_DATA_PARALLEL_SIZE)
    drain_timeout: int | float = Field(
        DRAIN_TIMEOUT_S, ge=0, le=3600, allow_inf_nan=False,
        description="Seconds the engines being removed may finish their requests; what is "
                    "left then moves to the others")
    startup_timeout: int | float = Field(
        SCALE_TIMEOUT_S, gt=0, le=3600, allow_inf_nan=False,
        description="fleetllm: seconds new engines may take to start before the scale "
                    "fails (and the fleet stays as it was)")


class ScaleElasticEPResponse(BaseModel):
    message: str
    new_data_parallel_size: int


class IsScalingResponse(BaseModel):
    is_scaling_elastic_ep: bool


def add_elastic_routes(app: FastAPI, engine: AsyncLLM) -> None:
    @app.post("/scale_elastic_ep", responses={
        **error_responses(400, 401, 503),
        409: {"model": ErrorResponse, "description": "Another scale is under way"}})
    async def scale_elastic_ep(body: ScaleElasticEPRequest) -> ScaleElasticEPResponse:
        try:
            await engine.scale_elastic_ep(body.new_data_parallel_size, body.drain_timeout,
                                          body.startup_timeout)
        except ScaleInProgressError as e:
            raise OpenAIError(str(e), 409, code="scale_in_progress") from e
        except ValueError as e:
            raise OpenAIError(str(e), param="new_data_parallel_size") from e
        except ScaleError as e:
            raise OpenAIError(f"{e}; the fleet keeps serving with "
                              f"{engine.data_parallel_size} engine core(s)", 503,
                              "server_error", code="scale_failed") from e
        size = engine.data_parallel_size
        return ScaleElasticEPResponse(
            message=f"scaled to {size} data-parallel engine core(s)",
            new_data_parallel_size=size)

    @app.get("/is_scaling_elastic_ep", responses=error_responses(401))
    async def is_scaling_elastic_ep() -> IsScalingResponse:
        return IsScalingResponse(is_scaling_elastic_ep=engine.is_scaling)
