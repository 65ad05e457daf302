"""DPCoordinator: every front end sees every data-parallel engine's load, and the
coordinator process is supervised (killed, it is restarted, and no request fails)."""

from __future__ import annotations

import time
from pathlib import Path

import psutil

from fleetllm import SamplingParams
from fleetllm.config import EngineArgs
from fleetllm.engine.client import SyncMPClient
from fleetllm.engine.launch import EngineConnection, launch_core_engines
from fleetllm.engine.messages import EngineCoreRequest
from tests.helpers import generate_ids, make_llm, random_prompts

KV = 1 << 24


def _coordinator(timeout: float = 10) -> psutil.Process:
    """The coordinator process (a new one names itself once it has imported fleetllm)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [p for p in psutil.Process().children(recursive=True)
                 if p.is_running() and p.name() == "fleetllm-coord"]
        if len(found) == 1 or time.monotonic() > deadline:
            assert len(found) == 1, found
            return found[0]
        time.sleep(0.05)


def _drive_until(client: SyncMPClient, done: set[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    finished: set[str] = set()
    while not done <= finished:
        assert time.monotonic() < deadline
        finished |= {o.request_id for o in client.step() if o.finished}


def test_a_front_end_sees_the_load_another_one_sent(llama_dir: Path) -> None:
    """Front end A leaves two long requests on engine 0 (and two short ones, finished, on
    engine 1). Front end B, which sent nothing yet, then sends its requests to engine 1:
    it sees A's load through the coordinator (by its own counts it would pick engine 0)."""
    config = EngineArgs(str(llama_dir), kv_cache_memory_bytes=KV).create_engine_config()
    manager, addresses, _ = launch_core_engines(config, 2, num_clients=2)
    a = b = None
    try:
        a, b = (SyncMPClient(config, connection=EngineConnection(addresses, i, 2))
                for i in range(2))
        long = SamplingParams(temperature=0, max_tokens=480, ignore_eos=True)
        short = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
        prompt = random_prompts((8,))[0]
        for k, params in enumerate([long, short, long, short]):
            a.add_request(EngineCoreRequest(f"a{k}", prompt, params, []))
        assert [a.requests[f"a{k}"].engine for k in range(4)] == [0, 1, 0, 1]
        _drive_until(a, {"a1", "a3"})
        deadline = time.monotonic() + 10
        while True:  # until B has a snapshot that shows A's two long requests
            b.loads._refresh()
            snap = b.loads.snapshot
            if snap is not None and snap.running == [2, 0]:
                break
            assert time.monotonic() < deadline, snap
            time.sleep(0.02)
        for k in range(2):
            b.add_request(EngineCoreRequest(f"b{k}", prompt, short, []))
        assert [b.requests[f"b{k}"].engine for k in range(2)] == [1, 1], (
            b.loads.snapshot, time.monotonic() - deadline)
        _drive_until(b, {"b0", "b1"})
    finally:
        for client in (a, b):
            if client is not None:
                client.shutdown()
        manager.close()


def test_killed_coordinator_is_restarted_and_no_request_fails(llama_dir: Path) -> None:
    prompts = random_prompts(tuple(5 + 3 * i for i in range(24)), seed=4)
    params = SamplingParams(temperature=0, max_tokens=120, ignore_eos=True)
    with make_llm(llama_dir, kv_cache_memory_bytes=KV) as single:
        expected = generate_ids(single, prompts, params)
    llm = make_llm(llama_dir, kv_cache_memory_bytes=KV, data_parallel_size=2)
    try:
        coordinator = llm.engine_core.proc_manager.coordinator
        first = _coordinator()
        client = llm.engine_core
        step = client.step

        def step_then_kill():  # kill it once every request is under way
            out = step()
            if all(len(u.output_token_ids) >= 10 for u in client.requests.values()):
                client.step = step
                first.kill()
            return out

        client.step = step_then_kill
        assert generate_ids(llm, prompts, params) == expected
        deadline = time.monotonic() + 10
        while coordinator.num_restarts < 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert _coordinator().pid != first.pid
        assert generate_ids(llm, prompts[:4], params) == expected[:4]
    finally:
        llm.shutdown()
    assert not first.is_running()
    assert not [p for p in psutil.Process().children(recursive=True)
                if p.name().startswith("fleetllm-")]
