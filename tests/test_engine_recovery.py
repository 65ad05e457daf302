"""Engine cores that die are restarted and no request is lost: faults are real signals
(SIGKILL of the process named fleetllm-core<i>, ray.kill of an engine actor); every request
ends as it would have without the fault, token for token."""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest
import torch

from fleetllm import LLM, SamplingParams
from fleetllm.entrypoints.openai.server import ENGINE_DEATH_GRACE_S
from fleetllm.errors import EngineDeadError, EngineRestartingError
from tests.helpers import (
    copy_checkpoint,
    engine_core_process,
    greedy,
    kill_mid_generate,
    make_llm,
    sigkill_engine_core,
)
from tests.test_engine_proc import _ours
from tests.test_openai_server import AUTH, KV, MAX_LEN, MODEL, Server, serve, wait_for_unhealthy

NUM_REQUESTS = 24
MAX_TOKENS = 150
STREAM_TOKENS = 120
STREAM_PROMPTS = [f"{p} {i}" for i in range(2) for p in (
    "The quick brown fox", "def fibonacci(n):", "class Point:", "import os",
    "Once upon a time", "x = [1, 2,", "SELECT * FROM", "for i in range(")]


def _prompts() -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(3)
    return [{"prompt_token_ids": torch.randint(1, 300, (4 + 5 * i,), generator=g).tolist()}
            for i in range(NUM_REQUESTS)]


def _seeded() -> list[SamplingParams]:
    return [SamplingParams(temperature=1.0, seed=100 + i, max_tokens=MAX_TOKENS,
                           ignore_eos=True) for i in range(NUM_REQUESTS)]


def _ids(llm: LLM, params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(_prompts(), params, use_tqdm=False)]


@pytest.fixture(scope="module")
def fault_free(llama_dir: Path) -> dict[str, list[list[int]]]:
    """Greedy and seeded outputs of one in-process engine, with no fault."""
    llm = make_llm(llama_dir, kv_cache_memory_bytes=KV)
    try:
        return {"greedy": _ids(llm, greedy(MAX_TOKENS)), "seeded": _ids(llm, _seeded())}
    finally:
        llm.shutdown()


def _wait_until_back(llm: LLM, timeout: float = 60.0) -> None:
    """Utility calls fail (not retried) while an engine restarts; they work once it is back."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            llm.get_stats()
            return
        except EngineRestartingError as e:
            assert "call again" in str(e)
            assert time.monotonic() < deadline, "the engine did not come back"
            time.sleep(0.1)


# ---- offline LLM ------------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "victim", "kind"), [
    ({"engine_process": True}, 0, "greedy"),
    ({"engine_process": True}, 0, "seeded"),
    ({"data_parallel_size": 2}, 1, "greedy"),
], ids=["one-engine", "one-engine-seeded", "dp2"])
def test_killed_engine_core_is_restarted_and_generate_matches(
        llama_dir: Path, fault_free: dict, kwargs: dict, victim: int, kind: str) -> None:
    llm = make_llm(llama_dir, kv_cache_memory_bytes=KV, **kwargs)
    params = greedy(MAX_TOKENS) if kind == "greedy" else _seeded()
    try:
        old_pid = engine_core_process(victim).pid
        delivered = kill_mid_generate(llm, lambda: sigkill_engine_core(victim))
        assert _ids(llm, params) == fault_free[kind]
        assert delivered and max(delivered) < MAX_TOKENS, "the kill came too late"
        core = llm.engine_core
        assert 0 < core.num_requests_recovered <= len(delivered)
        _wait_until_back(llm)
        assert core.num_engine_restarts == 1
        assert engine_core_process(victim).pid != old_pid
        # The restarted engine serves like the first: every engine gets work again.
        assert _ids(llm, params)[:8] == fault_free[kind][:8]
    finally:
        llm.shutdown()
    assert not _ours()


def test_recovery_off_fails_generate_as_before(llama_dir: Path) -> None:
    llm = make_llm(llama_dir, kv_cache_memory_bytes=KV, engine_process=True,
                   max_worker_restarts=0)
    start = time.monotonic()
    try:
        kill_mid_generate(llm, lambda: sigkill_engine_core(0))
        with pytest.raises(EngineDeadError, match=r"exited with code -9.*max_worker_restarts=0"):
            _ids(llm, greedy(MAX_TOKENS))
        assert time.monotonic() - start < 10
    finally:
        llm.shutdown()
    assert not _ours()


def test_failed_restart_fails_generate(llama_dir: Path, tmp_path: Path) -> None:
    model = copy_checkpoint(llama_dir, tmp_path / "model")
    llm = make_llm(model, kv_cache_memory_bytes=KV, engine_process=True)
    try:
        (model / "model.safetensors").unlink()  # the restarted engine cannot load it
        kill_mid_generate(llm, lambda: sigkill_engine_core(0))
        with pytest.raises(EngineDeadError, match=r"restart failed: .*E004"):
            _ids(llm, greedy(MAX_TOKENS))
    finally:
        llm.shutdown()
    assert not _ours()


class SlowRpc:
    """A worker extension with a utility call that takes a while."""

    def wait_a_while(self, seconds: float) -> bool:
        time.sleep(seconds)
        return True


def test_utility_call_to_a_dead_engine_fails_clearly(llama_dir: Path) -> None:
    llm = make_llm(llama_dir, kv_cache_memory_bytes=KV, engine_process=True,
                   worker_extension_cls="tests.test_engine_recovery.SlowRpc")
    try:
        threading.Timer(1.0, sigkill_engine_core).start()
        start = time.monotonic()
        with pytest.raises(EngineRestartingError, match=r"died .*utility calls are not retried"):
            llm.collective_rpc("wait_a_while", args=(60.0,))
        assert time.monotonic() - start < 10
        _wait_until_back(llm)
        assert llm.collective_rpc("wait_a_while", args=(0.0,)) == [True]
    finally:
        llm.shutdown()
    assert not _ours()


def test_killed_engine_actor_is_restarted(llama_dir: Path, fault_free: dict) -> None:
    ray = pytest.importorskip("ray", reason="--data-parallel-backend ray needs pip install "
                                            "-e .[ray]")
    from ray.util.placement_group import placement_group_table

    owns_ray = not ray.is_initialized()
    llm = make_llm(llama_dir, kv_cache_memory_bytes=KV, data_parallel_size=2,
                   data_parallel_backend="ray")
    manager = llm.engine_core.proc_manager
    try:
        dead = manager.actors[1]
        kill_mid_generate(llm, lambda: ray.kill(dead))
        assert _ids(llm, greedy(MAX_TOKENS)) == fault_free["greedy"]
        assert llm.engine_core.num_requests_recovered > 0
        _wait_until_back(llm)
        assert manager.actors[1] is not dead
        assert _ids(llm, greedy(MAX_TOKENS))[:8] == fault_free["greedy"][:8]
        groups = list(manager.placement_groups)
    finally:
        llm.shutdown()
    if owns_ray:
        assert not ray.is_initialized()  # the LLM started Ray, and stopped it
    else:
        assert all(placement_group_table(pg)["state"] == "REMOVED" for pg in groups)


# ---- fleetllm serve -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def fault_free_texts(llama_dir: Path) -> list[str]:
    llm = make_llm(llama_dir, kv_cache_memory_bytes=KV, max_model_len=MAX_LEN)
    try:
        outs = llm.generate(STREAM_PROMPTS, greedy(STREAM_TOKENS), use_tqdm=False)
        return [o.outputs[0].text for o in outs]
    finally:
        llm.shutdown()


@dataclass
class _Stream:
    prompt: str
    texts: list[str] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    usage: int | None = None
    error: str | None = None


def _read_stream(url: str, stream: _Stream) -> None:
    body = {"model": MODEL, "prompt": stream.prompt, "max_tokens": STREAM_TOKENS,
            "temperature": 0, "ignore_eos": True, "stream": True, "logprobs": 0,
            "stream_options": {"include_usage": True}}
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=AUTH,
                          timeout=60) as r:
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    stream.error = chunk["error"]["message"]
                for choice in chunk.get("choices", []):
                    stream.texts.append(choice["text"])
                    stream.tokens.extend(choice["logprobs"]["tokens"])
                    stream.finish_reason = choice["finish_reason"] or stream.finish_reason
                if chunk.get("usage"):
                    stream.usage = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError as e:
        stream.error = repr(e)


def _streams_survive_a_kill(server: Server, victim: int, want: list[str]) -> None:
    """16 greedy streams; once all are under way, SIGKILL engine core `victim`: every stream
    ends as it would have, /health never says 503 and the metrics count the recovery."""
    streams = [_Stream(p) for p in STREAM_PROMPTS]
    threads = [threading.Thread(target=_read_stream, args=(server.url, s)) for s in streams]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 60
        while min(len(s.tokens) for s in streams) < 3:
            assert time.monotonic() < deadline, [s.error for s in streams]
            time.sleep(0.01)
        engine = engine_core_process(victim, server.proc.pid)
        engine.suspend()  # so no stream can finish before the kill
        assert not any(s.finish_reason for s in streams)
        engine.kill()
        killed = time.monotonic()
        while time.monotonic() - killed < 10 and any(t.is_alive() for t in threads):
            assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200
            time.sleep(0.2)
    finally:
        for t in threads:
            t.join(120)
    for s, text in zip(streams, want):
        assert s.error is None, s.error
        assert s.finish_reason == "length" and s.usage == len(s.tokens) == STREAM_TOKENS
        assert "".join(s.texts) == text
    # With a second engine the streams did not wait for the restart: it may still run.
    deadline = time.monotonic() + 30
    while "fleetllm:engine_restarts_total 1.0" not in (
            metrics := httpx.get(f"{server.url}/metrics", timeout=10).text):
        assert time.monotonic() < deadline, metrics[-2000:]
        time.sleep(0.2)
    recovered = re.search(r"^fleetllm:requests_recovered_total (\S+)$", metrics, re.MULTILINE)
    assert recovered and float(recovered[1]) > 0, metrics[-2000:]
    assert "fleetllm:worker_restarts_total" in metrics


def test_serve_streams_survive_a_killed_engine(llama_dir: Path, tmp_path: Path,
                                              fault_free_texts: list[str]) -> None:
    with serve(llama_dir, tmp_path / "server.log") as server:
        _streams_survive_a_kill(server, 0, fault_free_texts)
        engines = server.engine_processes()  # `serve` checks only the ones it saw first
    _, alive = psutil.wait_procs(engines, timeout=10)
    assert not alive, f"left behind: {alive}"


def test_supervisor_restarts_a_killed_engine(llama_dir: Path, tmp_path: Path,
                                             fault_free_texts: list[str]) -> None:
    log = tmp_path / "server.log"
    with serve(llama_dir, log, "--data-parallel-size", "2", "--api-server-count", "2") as s:
        _streams_survive_a_kill(s, 1, fault_free_texts)
        engines = s.engine_processes()  # `serve` checks only the ones it saw first
        assert sorted(p.name() for p in engines) == ["fleetllm-core0", "fleetllm-core1"]
    _, alive = psutil.wait_procs(engines, timeout=10)
    assert not alive, f"left behind: {alive}"
    assert "engine core 1 is back" in log.read_text()  # the supervisor told the servers


def test_restart_limit_exhausted_fails_health_and_exits(llama_dir: Path, tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    with serve(llama_dir, log, "--max-worker-restarts", "1") as server:
        first = sigkill_engine_core(0, server.proc.pid)
        restarted = engine_core_process(0, server.proc.pid, timeout=30, other_than=first)
        body = {"model": MODEL, "prompt": "x", "max_tokens": 4}
        r = httpx.post(f"{server.url}/v1/completions", json=body, headers=AUTH, timeout=60)
        assert r.status_code == 200, r.text
        assert httpx.get(f"{server.url}/health").status_code == 200
        restarted.kill()
        wait_for_unhealthy(server.url, within=5.0)
        assert server.proc.wait(ENGINE_DEATH_GRACE_S + 20) == 1
        assert "max_worker_restarts=1" in log.read_text()
    _, alive = psutil.wait_procs([restarted], timeout=10)
    assert not alive
