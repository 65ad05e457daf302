"""An LLM's life: generate() refuses a sleeping engine, and an LLM dropped without shutdown()
still releases its workers (processes, Ray actors)."""

from __future__ import annotations

import gc
import os
import time
from pathlib import Path

import psutil
import pytest
import ray

from fleetllm import SamplingParams
from tests.helpers import generate_ids, greedy, make_llm, random_prompts

KV = 1 << 22


def _alive(pids: list[int]) -> list[int]:
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def _wait_gone(pids: list[int], seconds: float) -> list[int]:
    deadline = time.monotonic() + seconds
    while (alive := _alive(pids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive


def _worker_pids(llm) -> list[int]:
    return llm.collective_rpc(lambda w: os.getpid())


@pytest.mark.parametrize("level", [1, 2])
def test_generate_while_sleeping_says_wake_up_and_queues_nothing(llama_dir: Path,
                                                                 level: int) -> None:
    prompts = random_prompts((5, 17, 30))
    fresh = make_llm(llama_dir, kv_cache_memory_bytes=KV)
    try:
        ref = generate_ids(fresh, prompts, greedy(12))
    finally:
        fresh.shutdown()
    llm = make_llm(llama_dir, kv_cache_memory_bytes=KV)
    try:
        generate_ids(llm, prompts[:1], greedy(4))  # a used engine, with a warm prefix cache
        llm.sleep(level)
        message = rf"the engine is sleeping \(level {level}\); call wake_up\(\) first"
        with pytest.raises(RuntimeError, match=message):
            generate_ids(llm, prompts, greedy(12))
        with pytest.raises(RuntimeError, match=message):
            llm.chat([{"role": "user", "content": "hi"}], greedy(4), use_tqdm=False)
        assert not llm.engine_core.has_unfinished_requests()
        assert not llm.output_processor.children
        llm.wake_up(["weights"])  # half awake is still asleep
        with pytest.raises(RuntimeError, match=message):
            generate_ids(llm, prompts, greedy(12))
        llm.wake_up(["kv_cache"])
        assert generate_ids(llm, prompts, greedy(12)) == ref
    finally:
        llm.shutdown()


def test_dropped_in_process_llm_shuts_its_worker_down(llama_dir: Path) -> None:
    llm = make_llm(llama_dir, kv_cache_memory_bytes=KV)
    generate_ids(llm, random_prompts((5,)), greedy(4))
    executor = llm.engine_core.executor
    assert executor.driver_worker.worker is not None
    del llm
    gc.collect()
    assert executor.driver_worker.worker is None, "dropping the LLM did not shut it down"


def test_shutdown_then_drop_shuts_down_once(llama_dir: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    llm = make_llm(llama_dir, kv_cache_memory_bytes=KV)
    core = llm.engine_core
    calls = []
    real = core.executor.shutdown
    monkeypatch.setattr(core.executor, "shutdown", lambda: (calls.append(1), real())[1])
    llm.shutdown()
    llm.shutdown()
    del llm
    gc.collect()
    assert calls == [1]


def test_dropped_mp_llm_ends_its_worker_processes(llama_dir: Path) -> None:
    llm = make_llm(llama_dir, kv_cache_memory_bytes=KV, tensor_parallel_size=2,
                   distributed_executor_backend="mp")
    out = llm.generate({"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=4),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
    pids = _worker_pids(llm)
    children = {p.pid for p in psutil.Process().children(recursive=True)}
    assert len(pids) == 2 and set(pids) <= children
    # Whoever still holds the executor (a traceback, a callback) does not keep it running:
    # the LLM owns its engine.
    executor = llm.engine_core.executor
    del llm, out
    gc.collect()
    assert not _wait_gone(pids, 5.0), "worker processes outlived their dropped LLM"
    with pytest.raises(RuntimeError, match="shut down"):
        executor.collective_rpc("check_health")


@pytest.fixture(scope="module")
def small_ray_session():
    # Room for one tp=2 engine at a time (its two bundles of half a CPU): an engine that
    # kept its placement group after being dropped leaves the next without room to start.
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=True)
    yield
    ray.shutdown()


def test_dropped_ray_llms_free_their_actors_for_the_next(llama_dir: Path,
                                                        small_ray_session: None) -> None:
    prompts = random_prompts((5, 9))
    outputs = []
    all_pids: list[int] = []
    executors = []
    for _ in range(3):
        llm = make_llm(llama_dir, kv_cache_memory_bytes=KV, tensor_parallel_size=2,
                       distributed_executor_backend="ray")
        outputs.append(generate_ids(llm, prompts, greedy(6)))
        pids = _worker_pids(llm)
        all_pids += pids
        executors.append(llm.engine_core.executor)  # held, as in the mp test
        del llm
        gc.collect()
        assert not _wait_gone(pids, 10.0), "Ray workers outlived their dropped LLM"
    assert outputs[0] == outputs[1] == outputs[2]
    assert len(set(all_pids)) == 6
    assert ray.is_initialized()  # the session was the test's, not the engines' to stop
