"""One declared engine interface: every method of engine/protocol.py is implemented by
EngineCore, accepted by the engine process, and reachable with the declared signature through
LLM, LLM(engine_process=True) and AsyncLLM. The tests iterate over the declaration, so a new
engine method is covered here without touching this file."""

from __future__ import annotations

import asyncio
import inspect
from pathlib import Path
from typing import Any

import pytest

from fleetllm.config import EngineArgs
from fleetllm.engine import core_proc
from fleetllm.engine.async_llm import AsyncLLM
from fleetllm.engine.core import EngineCore
from fleetllm.engine.protocol import ENGINE_METHODS, EngineClientInterface
from fleetllm.lora.random_adapter import write_random_adapter
from fleetllm.lora.request import LoRARequest
from tests.helpers import make_llm

KV = 1 << 24
# Every method is called in the declaration's order (sleep precedes wake_up, so the engine is
# left as it was), with arguments chosen by parameter name, except:
SKIP_CALL = {"save_sharded_state"}  # covered by its own tests; writes the weights


@pytest.fixture(scope="module")
def adapter(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> LoRARequest:
    path = tmp_path_factory.mktemp("interface_lora") / "adapter"
    write_random_adapter(EngineArgs(str(llama_dir)).create_engine_config().model_config,
                         path, rank=4)
    return LoRARequest("interface", 1, str(path))


def _llm_kwargs() -> dict[str, Any]:
    # LoRA on, with room to pin one adapter, so that the LoRA methods can run too
    return {"kv_cache_memory_bytes": KV, "enable_lora": True, "max_cpu_loras": 2}


def _arguments(spec_name: str, tmp_path: Path, adapter: LoRARequest) -> dict[str, Any]:
    by_param = {"method": "check_health", "path": str(tmp_path / "sharded"),
                "new_data_parallel_size": 1, "lora_request": adapter,
                "lora_id": adapter.lora_int_id}
    params = list(ENGINE_METHODS[spec_name].signature.parameters.values())[1:]
    return {p.name: by_param[p.name] for p in params if p.default is inspect.Parameter.empty}


def test_engine_core_implements_every_declared_method() -> None:
    for name, spec in ENGINE_METHODS.items():
        impl = getattr(EngineCore, name)
        assert impl is not getattr(EngineClientInterface, name), f"EngineCore lacks {name}"
        declared = list(spec.signature.parameters)
        assert list(inspect.signature(impl).parameters) == declared, name
    assert core_proc.UTILITY_METHODS == set(ENGINE_METHODS)


@pytest.mark.parametrize("engine_process", [False, True], ids=["in-process", "engine-process"])
def test_llm_reaches_every_declared_method(llama_dir: Path, tmp_path: Path,
                                           adapter: LoRARequest, engine_process: bool) -> None:
    with make_llm(llama_dir, engine_process=engine_process, **_llm_kwargs()) as llm:
        for name, spec in ENGINE_METHODS.items():
            method = getattr(llm, name)
            assert list(inspect.signature(method).parameters) == list(
                spec.signature.parameters)[1:], name
            if name not in SKIP_CALL:
                method(**_arguments(name, tmp_path, adapter))
        assert llm.is_sleeping() is False
        assert llm.collective_rpc("check_health") == [None]
        assert llm.stats()["num_worker_restarts"] == 0
        assert llm.get_lora_requests() == []  # removed again by remove_lora


def test_async_llm_reaches_every_declared_method(llama_dir: Path, tmp_path: Path,
                                                 adapter: LoRARequest) -> None:
    async def run(llm: AsyncLLM) -> None:
        for name in ENGINE_METHODS:
            method = getattr(llm, name)
            assert inspect.iscoroutinefunction(method), name
            if name not in SKIP_CALL:
                await method(**_arguments(name, tmp_path, adapter))
        assert await llm.is_sleeping() is False
        assert await llm.collective_rpc("check_health") == [None]

    llm = AsyncLLM.from_engine_args(EngineArgs(model=str(llama_dir), **_llm_kwargs()))
    try:
        asyncio.run(run(llm))
    finally:
        llm.shutdown()


def test_arguments_are_checked_against_the_declaration(llama_dir: Path) -> None:
    """A wrong argument fails at the caller with TypeError, before reaching the engine."""
    with make_llm(llama_dir, kv_cache_memory_bytes=KV, engine_process=True) as llm:
        with pytest.raises(TypeError):
            llm.engine_core.reset_prefix_cache(True)
        with pytest.raises(TypeError):
            llm.engine_core.sleep(lvl=1)
        llm.engine_core.sleep(level=1)  # keywords are bound to the declared positions
        assert llm.engine_core.is_sleeping() is True
        llm.engine_core.wake_up()
        assert llm.engine_core.is_sleeping() is False
