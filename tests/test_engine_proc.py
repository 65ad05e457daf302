"""Engine cores in their own processes: handshake, data parallel, failures, clean exit."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch

from fleetllm import LLM, SamplingParams
from fleetllm.errors import EngineDeadError
from tests.helpers import mismatched_checkpoint

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
KV = 1 << 24


def _prompts(n: int = 8) -> list[dict]:
    g = torch.Generator().manual_seed(9)
    return [{"prompt_token_ids": torch.randint(1, 300, (3 + 11 * i,), generator=g).tolist()}
            for i in range(n)]


def _ours() -> list[psutil.Process]:
    """Child processes other than multiprocessing's resource tracker (Python's own)."""
    return [p for p in psutil.Process().children(recursive=True)
            if "resource_tracker" not in " ".join(p.cmdline())]


@pytest.fixture(scope="module")
def reference(llama_dir: Path) -> list[list[int]]:
    llm = LLM(str(llama_dir), kv_cache_memory_bytes=KV)
    try:
        return [o.outputs[0].token_ids for o in llm.generate(_prompts(), GREEDY, use_tqdm=False)]
    finally:
        llm.shutdown()


@pytest.mark.parametrize("kwargs", [{"engine_process": True}, {"data_parallel_size": 2}])
def test_engine_processes_match_in_process(llama_dir: Path, reference: list, kwargs: dict) -> None:
    llm = LLM(str(llama_dir), kv_cache_memory_bytes=KV, **kwargs)
    try:
        out = [o.outputs[0].token_ids for o in llm.generate(_prompts(), GREEDY, use_tqdm=False)]
        assert out == reference
        per_engine = llm.engine_core.call_utility("stats")
        assert len(per_engine) == kwargs.get("data_parallel_size", 1)
        assert all(s["prefix_cache_queries"] > 0 for s in per_engine), "an engine got no work"
        assert llm.collective_rpc("get_supported_tasks") == [["generate"]] * len(per_engine)
        assert llm.reset_prefix_cache()
        llm.sleep(1)
        llm.wake_up()
        assert [o.outputs[0].token_ids for o in llm.generate(_prompts(2), GREEDY,
                                                             use_tqdm=False)] == reference[:2]
    finally:
        llm.shutdown()
    assert not _ours()


def test_engine_that_fails_to_start_reports_its_error(llama_dir: Path, tmp_path: Path) -> None:
    bad = mismatched_checkpoint(llama_dir, tmp_path)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"E004.*mlp"):
        LLM(str(bad), engine_process=True)
    assert time.monotonic() - start < 60
    assert not _ours()


def test_killed_engine_fails_generate(llama_dir: Path) -> None:
    llm = LLM(str(llama_dir), kv_cache_memory_bytes=KV, engine_process=True,
              max_worker_restarts=0)  # recovery off: the old, fatal behaviour
    pid = llm.engine_core.proc_manager.processes[0].pid

    def kill_soon() -> None:
        time.sleep(0.5)
        os.kill(pid, signal.SIGKILL)

    threading.Thread(target=kill_soon, daemon=True).start()
    start = time.monotonic()
    try:
        with pytest.raises(EngineDeadError, match="exited"):
            llm.generate(_prompts() * 8, SamplingParams(max_tokens=500, ignore_eos=True),
                         use_tqdm=False)
        assert time.monotonic() - start < 10
    finally:
        llm.shutdown()
    assert not _ours()


def test_data_parallel_engines_split_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    from fleetllm.config import EngineConfig, ModelConfig, ParallelConfig
    from fleetllm.engine import core_proc

    threads: list[int] = []
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    config = EngineConfig(ModelConfig.__new__(ModelConfig), parallel_config=ParallelConfig(
        tensor_parallel_size=2))
    core_proc._share_cores(config, data_parallel_size=2)
    assert os.environ["OMP_NUM_THREADS"] == "2" and threads == [2]  # 8 cores / (2 x 2 ranks)
    core_proc._share_cores(config, data_parallel_size=2)  # an explicit setting wins
    assert threads == [2]
    monkeypatch.delenv("OMP_NUM_THREADS")
    core_proc._share_cores(config, data_parallel_size=1)  # one engine: the worker decides
    assert "OMP_NUM_THREADS" not in os.environ and threads == [2]
