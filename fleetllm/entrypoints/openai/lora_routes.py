"""LoRA adapters over HTTP, with vLLM's names: `--lora-modules name=path ...` at start-up,
and, only with `--allow-runtime-lora-updating`, POST /v1/load_lora_adapter and
/v1/unload_lora_adapter. The engines hold the registry (EngineCore.get_lora_requests), so
with several API servers and data-parallel engines a load made through one server reaches
every engine and is seen by every server."""

from __future__ import annotations

import json
from dataclasses import dataclass

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from fleetllm.engine.async_llm import AsyncLLM
from fleetllm.lora.request import LoRARequest

from .errors import OpenAIError
from .openapi import error_responses


def parse_lora_modules(specs: list[str] | None) -> list[LoRARequest]:
    """`name=path` or vLLM's JSON form `{"name": ..., "path": ...}`; ids 1, 2, ... in order,
    so that every API server gives the start-up adapters the same ids."""
    loras: list[LoRARequest] = []
    for spec in specs or []:
        if spec.lstrip().startswith("{"):
            try:
                data = json.loads(spec)
                name, path = data["name"], data["path"]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"--lora-modules {spec!r}: JSON needs \"name\" and \"path\" "
                                 f"({e})") from None
        else:
            name, sep, path = spec.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"--lora-modules {spec!r}: write NAME=PATH (or JSON with "
                                 "name and path)")
        if any(lora.lora_name == name for lora in loras):
            raise ValueError(f"--lora-modules names {name!r} twice")
        loras.append(LoRARequest(str(name), len(loras) + 1, str(path)))
    return loras


class LoadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    lora_name: str = Field(min_length=1, max_length=256)
    lora_path: str = Field(min_length=1, max_length=4096)


class UnloadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    lora_name: str = Field(min_length=1, max_length=256)
    lora_int_id: int | None = None


@dataclass(frozen=True)
class LoRAOptions:
    modules: tuple[LoRARequest, ...] = ()
    allow_runtime_updates: bool = False


def add_lora_routes(app: FastAPI, engine: AsyncLLM, base_names: list[str]) -> None:
    """The runtime load and unload routes (only with --allow-runtime-lora-updating)."""

    @app.post("/v1/load_lora_adapter", response_class=PlainTextResponse,
              responses=error_responses(400, 401, 503))
    async def load_lora_adapter(body: LoadLoRAAdapterRequest) -> str:
        if body.lora_name in base_names:
            raise OpenAIError(f"{body.lora_name!r} is the base model's name; choose another",
                              param="lora_name")
        loaded = await engine.get_lora_requests()
        if any(lora.lora_name == body.lora_name for lora in loaded):
            raise OpenAIError(f"the adapter {body.lora_name!r} is already loaded; unload it "
                              "first", param="lora_name", code="lora_already_loaded")
        lora_id = max((lora.lora_int_id for lora in loaded), default=0) + 1
        try:
            await engine.add_lora(LoRARequest(body.lora_name, lora_id, body.lora_path))
        except ValueError as e:  # LoRAAdapterError: checked before anything changed
            raise OpenAIError(str(e), param="lora_path", code="invalid_lora_adapter") from e
        return f"Success: LoRA adapter '{body.lora_name}' added successfully."

    @app.post("/v1/unload_lora_adapter", response_class=PlainTextResponse,
              responses=error_responses(400, 401, 404, 503))
    async def unload_lora_adapter(body: UnloadLoRAAdapterRequest) -> str:
        match = [lora for lora in await engine.get_lora_requests()
                 if lora.lora_name == body.lora_name]
        if not match:
            raise OpenAIError(f"the adapter {body.lora_name!r} is not loaded", 404,
                              param="lora_name", code="lora_not_found")
        await engine.remove_lora(match[0].lora_int_id)
        return f"Success: LoRA adapter '{body.lora_name}' removed successfully."
