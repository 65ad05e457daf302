"""The Executor surface on the in-process backend: rpc, timeouts, sleep, sharded state; and
the rpc request encoding the process backends share (a callable pickled once)."""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from fleetllm import LLM, SamplingParams
from fleetllm.config import EngineArgs
from fleetllm.errors import CommunicationTimeoutError, ConfigurationError
from fleetllm.executor import rpc
from fleetllm.executor.abstract import Executor
from fleetllm.executor.uniproc import UniProcExecutor
from fleetllm.worker.worker import Worker

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PROMPTS = [{"prompt_token_ids": [5, 6, 7, 8, 9] * 4}, {"prompt_token_ids": [11, 12]},
           {"prompt_token_ids": list(range(20, 60))}]


def _ids(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


@pytest.fixture(scope="module")
def llm(llama_dir: Path):
    engine = LLM(str(llama_dir), kv_cache_memory_bytes=1 << 24)
    yield engine
    engine.shutdown()


class NotAnExecutor:
    pass


class CustomExecutor(UniProcExecutor):
    """A user's executor named by qualname."""


def test_get_class_resolves_names_classes_and_qualnames(llama_dir: Path) -> None:
    def cfg(backend):
        return EngineArgs(model=str(llama_dir), distributed_executor_backend=backend
                          ).create_engine_config()

    assert Executor.get_class(cfg("uni")) is UniProcExecutor
    assert Executor.get_class(cfg(CustomExecutor)) is CustomExecutor
    assert Executor.get_class(cfg("tests.test_executor_uni.CustomExecutor")) is CustomExecutor
    with pytest.raises(TypeError, match="Executor subclass"):
        Executor.get_class(cfg(NotAnExecutor))
    with pytest.raises(TypeError, match="Executor subclass"):
        Executor.get_class(cfg("tests.test_executor_uni.NotAnExecutor"))
    with pytest.raises(ConfigurationError, match=r"\[E005\].*uni, mp, ray, external_launcher"):
        Executor.get_class(cfg("bogus"))
    with pytest.raises(ConfigurationError, match="E005"):
        EngineArgs(model=str(llama_dir), tensor_parallel_size=2,
                   distributed_executor_backend="uni").create_engine_config()


def test_custom_executor_by_qualname_gives_same_outputs(llm: LLM, llama_dir: Path) -> None:
    ref = _ids(llm)
    custom = LLM(str(llama_dir), kv_cache_memory_bytes=1 << 24,
                 distributed_executor_backend="tests.test_executor_uni.CustomExecutor")
    try:
        assert isinstance(custom.engine_core.executor, CustomExecutor)
        assert _ids(custom) == ref
    finally:
        custom.shutdown()


def test_collective_rpc_method_callable_args_and_futures(llm: LLM) -> None:
    ex = llm.engine_core.executor
    assert ex.collective_rpc("get_supported_tasks") == [("generate",)]
    assert llm.collective_rpc(lambda w, a, b=0: (w.rank, a + b), args=(2,), kwargs={"b": 3}) == [
        (0, 5)]
    futures = ex.collective_rpc(lambda w: "later", non_block=True)
    assert [f.result(timeout=5) for f in futures] == ["later"]
    res = ex.collective_rpc(lambda w: 1 / 0, return_exceptions=True)
    assert isinstance(res[0], ZeroDivisionError)
    with pytest.raises(ZeroDivisionError):
        ex.collective_rpc(lambda w: 1 / 0)
    with pytest.raises(AttributeError, match="no method 'nope'"):
        ex.collective_rpc("nope")


def test_timeout_raises_and_next_call_gets_its_own_result(llm: LLM) -> None:
    ex = llm.engine_core.executor
    start = time.perf_counter()
    with pytest.raises(CommunicationTimeoutError, match="E003"):
        ex.collective_rpc(lambda w: time.sleep(1.0) or "late", timeout=0.2)
    assert time.perf_counter() - start < 0.7
    assert ex.collective_rpc(lambda w: "mine", timeout=5) == ["mine"]
    assert ex.collective_rpc(lambda w: "inline") == ["inline"]
    futures = ex.collective_rpc(lambda w: time.sleep(0.5), non_block=True)
    with pytest.raises(TimeoutError):
        futures[0].result(timeout=0.1)
    futures[0].result(timeout=5)


def _slow_call(worker, seconds: float) -> str:
    time.sleep(seconds)
    return "done"


def test_non_block_future_times_out_with_e003_like_mp_and_ray(llm: LLM) -> None:
    ex = llm.engine_core.executor
    future = ex.collective_rpc(_slow_call, args=(0.5,), non_block=True)[0]
    with pytest.raises(CommunicationTimeoutError,
                       match=r"E003.*collective_rpc\('_slow_call'\).*within 0.1 s"):
        future.result(timeout=0.1)
    with pytest.raises(CommunicationTimeoutError, match="_slow_call"):
        future.exception(timeout=0.01)
    assert future.result(timeout=5) == "done"  # waiting again still gets the answer
    # return_exceptions: a failed call's exception is the future's value, as on mp and Ray
    failed = ex.collective_rpc(lambda w: 1 / 0, non_block=True, return_exceptions=True)[0]
    assert isinstance(failed.result(timeout=5), ZeroDivisionError)
    with pytest.raises(ZeroDivisionError):
        ex.collective_rpc(lambda w: 1 / 0, non_block=True)[0].result(timeout=5)


@pytest.mark.parametrize("level", [1, 2])
def test_sleep_and_wake_up_keep_outputs(llm: LLM, level: int) -> None:
    ref = _ids(llm)
    llm.sleep(level)
    ex = llm.engine_core.executor
    assert ex.is_sleeping and ex.sleeping_tags == {"weights", "kv_cache"}
    usage = llm.collective_rpc("get_memory_usage")[0]
    assert usage["kv_cache_bytes"] == 0
    assert (usage["weights_bytes"] == 0) == (level == 2)
    llm.wake_up(["weights"])
    assert ex.is_sleeping and ex.sleeping_tags == {"kv_cache"}
    llm.wake_up(["kv_cache"])
    assert not ex.is_sleeping
    assert _ids(llm) == ref


def test_save_sharded_state_round_trip(llm: LLM, llama_dir: Path, tmp_path: Path) -> None:
    ref = _ids(llm)
    out = tmp_path / "sharded"
    llm.save_sharded_state(str(out), max_size=50_000)
    assert len(list(out.glob("model-rank-0-part-*.safetensors"))) > 1
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(llama_dir / name, out / name)
    loaded = LLM(str(out), load_format="sharded_state", kv_cache_memory_bytes=1 << 24)
    try:
        assert _ids(loaded) == ref
    finally:
        loaded.shutdown()


def test_performance_metrics_are_real_numbers(llm: LLM) -> None:
    _ids(llm)
    m = llm.get_performance_metrics()
    assert m["latency"]["count"] > 0 and 0 < m["latency"]["p50_ms"] <= m["latency"]["p99_ms"]
    assert m["throughput"]["tokens"] > 0 and m["throughput"]["tokens_per_s"] > 0
    worker = m["resource_utilization"][0]
    assert worker["rss_bytes"] > 0 and worker["weights_bytes"] > 0
    assert worker["kv_cache_bytes"] == 1 << 24 or worker["kv_cache_bytes"] > 0


def test_profile_writes_a_trace(llm: LLM, tmp_path: Path) -> None:
    llm.collective_rpc("profile", kwargs={"is_start": True, "trace_dir": str(tmp_path)})
    _ids(llm)
    llm.collective_rpc("profile", kwargs={"is_start": False})
    assert list(tmp_path.rglob("*.json")) or list(tmp_path.rglob("*.pt.trace.json*"))


@pytest.mark.parametrize("extra", [{}, {"max_num_batched_tokens": 16}])
def test_async_scheduling_keeps_outputs_and_overlaps_steps(llm: LLM, llama_dir: Path,
                                                           extra: dict) -> None:
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (1, 7, 12)]
    params[1] = SamplingParams(temperature=0.9, seed=4, max_tokens=12)
    ref = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    engine = LLM(str(llama_dir), kv_cache_memory_bytes=1 << 24, async_scheduling=True, **extra)
    try:
        ex = engine.engine_core.executor
        assert ex.max_concurrent_batches == 2
        peak = [0]
        submit = ex.execute_model

        def counting(so, non_block=False):
            # steps the engine has submitted and not consumed yet, this one included
            peak[0] = max(peak[0], len(engine.engine_core.batch_queue) + 1)
            return submit(so, non_block)

        ex.execute_model = counting
        out = [o.outputs[0].token_ids for o in engine.generate(PROMPTS, params, use_tqdm=False)]
        assert out == ref
        assert peak[0] == 2, "step N+1 should be scheduled while step N runs"
    finally:
        engine.shutdown()


def _os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _parallel_op(worker: Worker) -> int:
    torch.ones(1 << 22).sum()  # large enough to run on every intra-op thread
    return torch.get_num_threads()


def test_a_timed_call_starts_no_second_openmp_team(llama_dir: Path) -> None:
    # libgomp stops spinning its idle workers once it manages more threads than CPUs, and
    # every op then waits for one to wake: a side thread with its own team made batch-1
    # decode 1.6x slower on 2 cores. The side thread runs with one intra-op thread.
    engine = LLM(str(llama_dir), kv_cache_memory_bytes=1 << 24)
    try:
        assert engine.collective_rpc(_parallel_op) == [torch.get_num_threads()]  # inline
        before = _os_threads()
        assert engine.collective_rpc(_parallel_op, timeout=30) == [1]
        assert _os_threads() == before + 1  # the side thread itself, no OpenMP workers
        assert engine.collective_rpc(_parallel_op) == [torch.get_num_threads()]
    finally:
        engine.shutdown()


def test_async_scheduling_keeps_the_worker_on_one_thread(llama_dir: Path) -> None:
    engine = LLM(str(llama_dir), kv_cache_memory_bytes=1 << 24, async_scheduling=True)
    try:
        engine.generate(PROMPTS, GREEDY, use_tqdm=False)
        inline = engine.collective_rpc(lambda w: threading.get_ident())
        timed = engine.collective_rpc(lambda w: threading.get_ident(), timeout=30)
        future = engine.engine_core.executor.collective_rpc(lambda w: threading.get_ident(),
                                                            non_block=True)[0]
        assert inline == timed == [future.result(timeout=30)]
        assert inline[0] != threading.get_ident()  # the caller's thread only schedules
        # the worker thread kept the full intra-op count its init_device set
        assert engine.collective_rpc(_parallel_op) == [torch.get_num_threads()]
    finally:
        engine.shutdown()


def test_async_scheduling_needs_one_worker(llama_dir: Path) -> None:
    with pytest.raises(ConfigurationError, match="single worker"):
        LLM(str(llama_dir), async_scheduling=True, tensor_parallel_size=2)


# ---- rpc: a callable is pickled once, and never goes stale --------------------------------
SCALE = 10


def _scaled(worker, x: int) -> int:
    return x * SCALE


def _send(method, args: tuple = (), kwargs: dict | None = None):
    """What a worker process runs for one collective_rpc: (the callable it got, its result)."""
    req = rpc.decode_request(rpc.make_request(0, method, args, kwargs or {}, -1))
    assert req.pickled, "a callable's replies are pickled, so `pickled` must be set"
    fn, a, kw = rpc.unpack_request(req, Worker)
    return fn, fn("worker", *a, **kw)


def test_callable_is_pickled_and_loaded_once_with_args_per_call(
        monkeypatch: pytest.MonkeyPatch) -> None:
    dumped = []
    dumps = rpc.cloudpickle.dumps
    monkeypatch.setattr(rpc.cloudpickle, "dumps", lambda obj, *a, **k: (
        dumped.append(obj), dumps(obj, *a, **k))[1])
    offset = 5
    add = lambda w, x, y=0: (w, x + y + offset)  # noqa: E731 - a lambda is the costly case
    calls = [_send(add, (i,), {"y": 100 * i}) for i in range(3)]
    assert [result for _, result in calls] == [("worker", 5), ("worker", 106), ("worker", 207)]
    assert sum(obj is add for obj in dumped) == 1, "the function was pickled at every call"
    assert calls[0][0] is calls[1][0] is calls[2][0], "the worker loaded it at every call"
    assert [_send(_scaled, (i,))[1] for i in (1, 2)] == [10, 20]  # an importable function


def _make_getter(value: object):
    return lambda w: value


def test_reused_pickle_follows_rebound_cells_globals_and_defaults(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # two functions from one code object, with their own captured values
    assert [_send(_make_getter(1))[1], _send(_make_getter(2))[1]] == [1, 2]
    level = 1

    def read(w, extra=0):
        return level + extra + SCALE

    assert _send(read)[1] == 11
    level = 2  # the cell is rebound
    assert _send(read)[1] == 12
    monkeypatch.setattr(sys.modules[__name__], "SCALE", 20)  # a global it reads, rebound
    assert _send(read)[1] == 22
    read.__defaults__ = (100,)
    assert _send(read)[1] == 122


def test_callable_capturing_mutable_state_is_pickled_at_every_call() -> None:
    seen = [1]
    assert _send(lambda w: list(seen))[1] == [1]
    read = lambda w: list(seen)  # noqa: E731
    assert _send(read)[1] == [1]
    copy = seen.copy  # a builtin bound to the list, pickled with it
    read_copy = lambda w: copy()  # noqa: E731
    assert _send(read_copy)[1] == [1]
    seen.append(2)  # changed in place: only a new pickle sees it
    assert _send(read)[1] == [1, 2]
    assert _send(read_copy)[1] == [1, 2]
    box = {"n": 0}

    def bump(w):
        box["n"] += 1
        return box["n"]

    # each call gets its own copy of what the callable captured, as before the cache
    assert [_send(bump)[1] for _ in range(3)] == [1, 1, 1]
