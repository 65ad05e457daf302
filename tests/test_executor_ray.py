"""RayDistributedExecutor: same outputs as uni for tp/pp layouts, rpc semantics, timeouts,
crashes and clean shutdown.

One Ray session serves the whole module (starting Ray costs seconds); the executors must
use it as they find it and leave it running.
"""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest

from fleetllm import LLM, SamplingParams
from fleetllm.errors import CommunicationTimeoutError, EngineDeadError, WorkerCrashedError
from tests.helpers import generate_ids
from tests.test_executor_mp import GREEDY, KV, _prompts, assert_same_greedy

ray = pytest.importorskip("ray", reason="the ray backend needs Ray: pip install -e .[ray]")

from fleetllm.executor.ray import RayDistributedExecutor  # noqa: E402 - needs ray


def _wait_gone(pids: list[int], seconds: float = 10.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while True:
        alive = [p for p in pids if psutil.pid_exists(p)
                 and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


STARTS_RAY_SCRIPT = """
import os, time, psutil, ray
from fleetllm import LLM, SamplingParams
from fleetllm.errors import WorkerCrashedError

def children():
    return [p.pid for p in psutil.Process().children(recursive=True)
            if p.status() != psutil.STATUS_ZOMBIE]

def make():
    return LLM({model!r}, kv_cache_memory_bytes=1 << 24, distributed_executor_backend="ray",
               tensor_parallel_size=2)

def main():
    llm = make()
    print("PIDS", *llm.collective_rpc(lambda w: os.getpid()), flush=True)
    out = llm.generate({{"prompt_token_ids": [1, 2, 3]}}, SamplingParams(max_tokens=4),
                       use_tqdm=False)
    print("TOKENS", len(out[0].outputs[0].token_ids), flush=True)
    llm.shutdown()
    print("RAY", ray.is_initialized(), flush=True)
    print("CHILDREN", *children(), flush=True)

    # The user's session, shut down under a live executor.
    ray.init(num_cpus=2, include_dashboard=False)
    llm = make()
    fired = []
    llm.engine_core.executor.register_failure_callback(lambda: fired.append(1))
    ray.shutdown()
    try:
        llm.collective_rpc("check_health")
    except WorkerCrashedError as e:
        print("RAISED", "E002" in str(e), flush=True)
    time.sleep(0.5)  # time for a second (wrong) callback from the monitor
    print("FIRED", len(fired), flush=True)  # by the monitor or the call, whichever was first
    llm.shutdown()
    print("RESTARTED", ray.is_initialized(), flush=True)  # no Ray call may start a new one

if __name__ == "__main__":
    main()
"""


def test_executor_that_started_ray_stops_it(llama_dir: Path, tmp_path: Path) -> None:
    """Runs first, in its own process, before this module's shared session exists."""
    script = tmp_path / "starts_ray.py"
    script.write_text(textwrap.dedent(STARTS_RAY_SCRIPT.format(model=str(llama_dir))))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          env=env, timeout=180)
    lines = {line.split()[0]: line.split()[1:] for line in proc.stdout.splitlines() if line}
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert lines["TOKENS"] == ["4"]
    assert lines["RAY"] == ["False"]  # it started Ray, so it stopped it
    assert lines["CHILDREN"] == [], "Ray or worker processes outlived shutdown()"
    assert not _wait_gone([int(p) for p in lines["PIDS"]])
    assert lines["FIRED"] == ["1"] and lines["RAISED"] == ["True"]
    assert lines["RESTARTED"] == ["False"]


def test_missing_ray_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` finds when not installed
    monkeypatch.delitem(sys.modules, "fleetllm.executor.ray")
    with pytest.raises(ImportError, match=r"pip install -e \.\[ray\]"):
        importlib.import_module("fleetllm.executor.ray")


@pytest.fixture(scope="module")
def ray_session():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=True)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(llama_dir: Path) -> list:
    llm = LLM(str(llama_dir), kv_cache_memory_bytes=KV)
    try:
        return llm.generate(_prompts(), GREEDY, use_tqdm=False)
    finally:
        llm.shutdown()


def _ray_llm(llama_dir: Path, tp: int = 1, pp: int = 1, **kwargs: object) -> LLM:
    return LLM(str(llama_dir), kv_cache_memory_bytes=KV, distributed_executor_backend="ray",
               tensor_parallel_size=tp, pipeline_parallel_size=pp, **kwargs)


@pytest.fixture(scope="module")
def tp2(llama_dir: Path, ray_session: None):
    llm = _ray_llm(llama_dir, tp=2)
    yield llm
    llm.shutdown()


def test_tp2_matches_uni(tp2: LLM, reference: list) -> None:
    ex = tp2.engine_core.executor
    assert isinstance(ex, RayDistributedExecutor) and ex.uses_ray
    assert tp2.collective_rpc(lambda w: (w.rank, w.pc.tp_rank, w.pc.pp_rank)) == [
        (0, 0, 0), (1, 1, 0)]
    assert_same_greedy(reference, tp2.generate(_prompts(), GREEDY, use_tqdm=False))
    assert ex.max_concurrent_batches == 1


def test_async_scheduling_on_one_worker_matches_uni(llama_dir: Path, ray_session: None,
                                                   reference: list) -> None:
    llm = LLM(str(llama_dir), kv_cache_memory_bytes=KV, distributed_executor_backend="ray",
              async_scheduling=True)
    try:
        assert llm.engine_core.executor.max_concurrent_batches == 2
        out = llm.generate(_prompts(), GREEDY, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in out] == [
            o.outputs[0].token_ids for o in reference]
    finally:
        llm.shutdown()


def test_pp2_matches_uni_and_shuts_down_cleanly(llama_dir: Path, ray_session: None,
                                                reference: list) -> None:
    llm = _ray_llm(llama_dir, pp=2)
    ex = llm.engine_core.executor
    pids = llm.collective_rpc(lambda w: os.getpid())
    pgs = ex._own_pgs
    assert len(pgs) == 2  # one group per pipeline stage
    try:
        assert llm.collective_rpc(lambda w: (w.rank, w.pc.tp_rank, w.pc.pp_rank)) == [
            (0, 0, 0), (1, 0, 1)]
        assert ex.max_concurrent_batches == 2 and llm.engine_core.batch_queue.maxlen == 2
        assert_same_greedy(reference, llm.generate(_prompts(), GREEDY, use_tqdm=False))
    finally:
        llm.shutdown()
    ex.shutdown()  # idempotent
    assert not _wait_gone(pids), "a Ray worker outlived shutdown()"
    assert all(ray.util.placement_group_table(pg)["state"] == "REMOVED" for pg in pgs)
    assert ray.is_initialized()  # the module's session is not the executor's to stop
    with pytest.raises(RuntimeError, match="shut down"):
        ex.collective_rpc("check_health")


def _fail_on_rank_1(worker, x, rank0_seconds=0.0):
    if worker.rank == 1:
        raise KeyError(f"rank 1 refuses {x}")
    time.sleep(rank0_seconds)
    return x


def test_collective_rpc_forms(tp2: LLM) -> None:
    ex = tp2.engine_core.executor
    assert ex.collective_rpc("get_supported_tasks") == [("generate",), ("generate",)]
    specs = ex.get_kv_cache_specs()
    assert type(next(iter(specs[0].values()))).__name__ == "KVCacheSpec"  # typed, not a dict
    assert ex.collective_rpc(lambda w, a, b=0: w.rank * 10 + a + b, args=(1,),
                             kwargs={"b": 2}) == [3, 13]
    futures = ex.collective_rpc(lambda w: w.rank, non_block=True)
    assert [f.result(timeout=10) for f in futures] == [0, 1]
    assert ex.collective_rpc(lambda w: w.rank, unique_reply_rank=1) == [1]
    res = ex.collective_rpc(_fail_on_rank_1, args=("x",), return_exceptions=True)
    assert res[0] == "x" and isinstance(res[1], KeyError) and "rank 1" in str(res[1])
    with pytest.raises(KeyError, match="rank 1 refuses"):
        ex.collective_rpc(_fail_on_rank_1, args=("y",))
    # Only rank 0 replies, but rank 1's failure still reaches the caller at once.
    start = time.perf_counter()
    with pytest.raises(KeyError):
        ex.collective_rpc(_fail_on_rank_1, args=("z", 3.0), unique_reply_rank=0, timeout=20)
    assert time.perf_counter() - start < 2.0
    assert ex.collective_rpc(lambda w: "still fine") == ["still fine", "still fine"]


def _sleepy(worker, seconds, tag):
    time.sleep(seconds)
    return tag


def test_timeout_then_next_call_gets_its_own_result(tp2: LLM) -> None:
    ex = tp2.engine_core.executor
    start = time.perf_counter()
    with pytest.raises(CommunicationTimeoutError, match="E003"):
        ex.collective_rpc(_sleepy, args=(1.5, "late"), timeout=0.3)
    assert time.perf_counter() - start < 0.8
    assert ex.collective_rpc(_sleepy, args=(0, "mine")) == ["mine", "mine"]
    futures = ex.collective_rpc(_sleepy, args=(1.0, "f"), non_block=True)
    with pytest.raises(TimeoutError):
        futures[0].result(timeout=0.2)
    assert [f.result(timeout=10) for f in futures] == ["f", "f"]
    out = tp2.generate(_prompts(2), GREEDY, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 16 for o in out)


def test_health_and_performance_metrics(tp2: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    ex = tp2.engine_core.executor
    ex.check_health()
    monkeypatch.setattr("fleetllm.executor.ray.HEALTH_TIMEOUT_S", 0.3)
    busy = ex.collective_rpc(_sleepy, args=(1.0, "busy"), non_block=True)
    with pytest.raises(WorkerCrashedError, match=r"rank\(s\) \[0, 1\] did not answer"):
        ex.check_health()
    assert [f.result(timeout=10) for f in busy] == ["busy", "busy"]
    ex.check_health()  # unresponsive is not dead: it passes once they are free again
    tp2.generate(_prompts(2), GREEDY, use_tqdm=False)
    m = tp2.get_performance_metrics()
    assert m["latency"]["count"] > 0 and m["latency"]["p99_ms"] > 0
    assert [w["rank"] for w in m["resource_utilization"]] == [0, 1]
    assert all(w["rss_bytes"] > 0 and w["weights_bytes"] > 0 for w in m["resource_utilization"])


# ray.kill of a rank that does not reply to execute_model; a SIGKILL of the one that does,
# where the survivor's broken collective usually reports before Ray reports the death.
@pytest.mark.parametrize("how,rank", [("ray.kill", 1), ("SIGKILL", 0)])
def test_killed_actor_without_recovery_kills_the_engine(llama_dir: Path, ray_session: None,
                                                        how: str, rank: int) -> None:
    llm = _ray_llm(llama_dir, tp=2, max_worker_restarts=0)
    ex = llm.engine_core.executor
    pids = llm.collective_rpc(lambda w: os.getpid())
    fired: list[float] = []
    ex.register_failure_callback(lambda: fired.append(time.monotonic()))
    killed: list[float] = []

    def kill_soon() -> None:
        time.sleep(0.5)
        killed.append(time.monotonic())
        if how == "ray.kill":
            ray.kill(ex.workers[rank])
        else:
            os.kill(pids[rank], signal.SIGKILL)

    threading.Thread(target=kill_soon, daemon=True).start()
    many = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    try:
        with pytest.raises(EngineDeadError, match=f"E002.*rank {rank}") as info:
            llm.generate(_prompts(8) * 4, many, use_tqdm=False)
        assert isinstance(info.value.__cause__, WorkerCrashedError)
        assert len(fired) == 1 and fired[0] - killed[0] < 1.0
        # An engine that gives up ends its actors at once, not at shutdown().
        assert not _wait_gone(pids), "a Ray worker outlived the engine's death"
        with pytest.raises(RuntimeError, match="shut down"):
            ex.check_health()
        late: list[float] = []
        ex.register_failure_callback(lambda: late.append(1.0))  # already failed: runs at once
        assert late == [1.0] and len(fired) == 1
    finally:
        llm.shutdown()
    llm.shutdown()  # idempotent
    assert not _wait_gone(pids), "a Ray worker outlived shutdown()"
    assert ray.is_initialized()


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_killed_actor_is_replaced_and_nothing_is_lost(llama_dir: Path, ray_session: None,
                                                      tp: int, pp: int) -> None:
    from tests.test_recovery import LONG, PROMPTS, _after_steps

    llm = _ray_llm(llama_dir, tp=tp, pp=pp)
    try:
        clean = generate_ids(llm, PROMPTS, LONG)
        llm.reset_prefix_cache()
        ex = llm.engine_core.executor
        old = llm.collective_rpc(lambda w: os.getpid())
        victim = ex.workers[1]
        _after_steps(llm, 20, lambda: ray.kill(victim))
        assert generate_ids(llm, PROMPTS, LONG) == clean
        assert llm.engine_core.num_worker_restarts == 1
        assert not _wait_gone(old), "a replaced Ray worker is still running"
        new = llm.collective_rpc(lambda w: os.getpid())
        assert not set(new) & set(old)
    finally:
        llm.shutdown()
    assert not _wait_gone(new)


def test_uneven_pipeline_stages_on_ray(ckpt, ray_session: None) -> None:
    model = ckpt("llama", num_hidden_layers=5)
    with LLM(str(model), kv_cache_memory_bytes=KV) as uni:
        ref = uni.generate(_prompts(), GREEDY, use_tqdm=False)
    llm = LLM(str(model), kv_cache_memory_bytes=KV, distributed_executor_backend="ray",
              pipeline_parallel_size=3)
    try:
        held = llm.collective_rpc(lambda w: sorted(int(i) for i in w.model_runner.model.layers))
        assert held == [[0, 1], [2, 3], [4]]
        assert_same_greedy(ref, llm.generate(_prompts(), GREEDY, use_tqdm=False))
    finally:
        llm.shutdown()


def test_uses_the_callers_placement_group(llama_dir: Path, ray_session: None) -> None:
    from ray.util.placement_group import placement_group, placement_group_table
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    pg = placement_group([{"CPU": 1.0}, {"CPU": 1.0}])
    ray.get(pg.ready(), timeout=60)

    def run(model: str) -> tuple[bool, list[int], int]:
        # Self-contained, so Ray ships it by value and the task need not import this module.
        from fleetllm import LLM, SamplingParams

        llm = LLM(model, kv_cache_memory_bytes=1 << 24, distributed_executor_backend="ray",
                  tensor_parallel_size=2)
        try:
            ex = llm.engine_core.executor
            out = llm.generate({"prompt_token_ids": [1, 2, 3]}, SamplingParams(max_tokens=4),
                               use_tqdm=False)
            return not ex._own_pgs, ex._pids, len(out[0].outputs[0].token_ids)
        finally:
            llm.shutdown()

    # A driver running inside the group (as under Ray Serve or Tune) places its ranks there.
    strategy = PlacementGroupSchedulingStrategy(pg, placement_group_capture_child_tasks=True)
    task = ray.remote(num_cpus=0)(run).options(scheduling_strategy=strategy)
    try:
        reused, pids, tokens = ray.get(task.remote(str(llama_dir)), timeout=120)
        assert reused and tokens == 4
        assert not _wait_gone(pids)
        assert placement_group_table(pg)["state"] == "CREATED"  # the caller's to remove
    finally:
        ray.util.remove_placement_group(pg)


def test_data_parallel_engine_actors(llama_dir: Path, ray_session: None,
                                     reference: list) -> None:
    """CoreEngineActorManager: DP engines as actors, each in its own STRICT_PACK group; a
    killed engine actor fails generate at once; shutdown removes actors and groups."""
    from ray.util.placement_group import placement_group_table

    from fleetllm.errors import EngineDeadError

    llm = LLM(str(llama_dir), kv_cache_memory_bytes=KV, data_parallel_size=2, max_worker_restarts=0,
              data_parallel_backend="ray")
    manager = llm.engine_core.proc_manager
    try:
        assert_same_greedy(llm.generate(_prompts(), GREEDY, use_tqdm=False), reference)
        stats = llm.engine_core.call_utility("stats")
        assert all(s["prefix_cache_queries"] > 0 for s in stats), "an engine got no work"
        groups = [placement_group_table(pg) for pg in manager.placement_groups]
        assert [g["strategy"] for g in groups] == ["STRICT_PACK"] * 2
        ray.kill(manager.actors[1])
        start = time.monotonic()
        with pytest.raises(EngineDeadError, match="EngineCoreActor_1"):
            llm.generate(_prompts() * 4, SamplingParams(max_tokens=200, ignore_eos=True),
                         use_tqdm=False)
        assert time.monotonic() - start < 5
    finally:
        llm.shutdown()
    assert all(placement_group_table(pg)["state"] == "REMOVED"
               for pg in manager.placement_groups)
    assert ray.is_initialized()  # the caller's session is left running
