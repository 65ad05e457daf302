"""`fleetllm serve` as a tree of processes: data-parallel engine cores (processes or Ray
actors), several API server processes on one port, and the supervisor over them."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from fleetllm import SamplingParams
from fleetllm.entrypoints.openai.server import ENGINE_DEATH_GRACE_S
from tests.helpers import make_llm, mismatched_checkpoint
from tests.test_openai_server import (
    API_KEY,
    AUTH,
    ENV,
    KV,
    MAX_LEN,
    MODEL,
    Server,
    _free_port,
    kill_engines_mid_stream,
    serve,
)

PROMPTS = ["The quick brown fox", "def fibonacci(n):", "class Point:", "import os",
           "Once upon a time", "x = [1, 2,", "SELECT * FROM", "for i in range("]
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def reference(llama_dir: Path) -> list[str]:
    """Greedy texts from one in-process engine."""
    llm = make_llm(llama_dir, kv_cache_memory_bytes=KV, max_model_len=MAX_LEN)
    try:
        params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
        return [o.outputs[0].text for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    finally:
        llm.shutdown()


def _complete_all(url: str) -> list[str]:
    """Every prompt at once, each on its own connection (so the kernel spreads them)."""
    def one(prompt: str) -> str:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0,
                               timeout=60)
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS,
                                      temperature=0, extra_body={"ignore_eos": True})
        client.close()
        return r.choices[0].text

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        return list(pool.map(one, PROMPTS * 2))[:len(PROMPTS)]


def _servers_answering(server: Server, log: Path, rounds: int = 25) -> set[str]:
    """Indexes of the API servers that answered, over up to `rounds` bursts of 8 requests,
    each on its own new connection, sent at once."""
    pattern = re.compile(r"api_server(\d) uvicorn.access: .*GET /v1/models")

    def one(_: int) -> int:
        with httpx.Client(headers=AUTH, timeout=10) as c:  # a new connection each
            return c.get(f"{server.url}/v1/models").status_code

    served: set[str] = set()
    with ThreadPoolExecutor(8) as pool:
        for _ in range(rounds):
            assert set(pool.map(one, range(8))) == {200}
            served = set(pattern.findall(log.read_text()))
            if len(served) == 2:
                break
    return served


def _engine_queries(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {m[0]: float(m[1]) for m in
            re.findall(r'^fleetllm:prefix_cache_queries_total\{engine="(\d+)"\} (\S+)$', text,
                       re.MULTILINE)}


def test_data_parallel_and_two_api_servers(llama_dir: Path, reference: list[str],
                                           tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    with serve(llama_dir, log, "--data-parallel-size", "2", "--api-server-count", "2") as s:
        assert _complete_all(s.url) == reference
        queries = _engine_queries(s.url)
        assert sorted(queries) == ["0", "1"]
        assert all(q > 0 for q in queries.values()), f"an engine got no work: {queries}"
        # Both API server processes answer requests (each logs with its index). The kernel
        # hands each new connection to one of them as it likes (a few pooled connections
        # once all went to one server), so fresh connections are opened until both have
        # answered; the bound keeps a server that never answers a failure.
        assert _servers_answering(s, log) == {"0", "1"}, log.read_text()[-2000:]
        names = sorted(p.name() for p in psutil.Process(s.proc.pid).children())
        assert [n for n in names if n.startswith("fleetllm-")] == [
            "fleetllm-api0", "fleetllm-api1", "fleetllm-coord", "fleetllm-core0",
            "fleetllm-core1"]
        # Whichever server answers a scrape reports the requests of both.
        want = 2 * len(PROMPTS) * MAX_TOKENS
        for _ in range(6):
            text = httpx.get(f"{s.url}/metrics", timeout=10).text
            assert f"fleetllm:generation_tokens_total {want:.1f}" in text, text[:3000]


def test_a_burst_splits_between_engines_and_survives_the_coordinator(
        llama_dir: Path, tmp_path: Path) -> None:
    """64 requests at once through 2 API servers onto 2 engines: each engine gets 40-60% of
    them (the prompts are of one length, so an engine's prefix-cache queries count its
    requests), the greedy texts equal one engine's, and killing the DPCoordinator
    mid-burst fails none of them."""
    prompts = [[(7 * k + j) % 250 + 1 for j in range(16)] for k in range(64)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    with make_llm(llama_dir, kv_cache_memory_bytes=KV, max_model_len=MAX_LEN) as llm:
        expected = [o.outputs[0].text for o in llm.generate(
            [{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)]
    with serve(llama_dir, tmp_path / "server.log", "--data-parallel-size", "2",
               "--api-server-count", "2") as s:
        coordinator = next(p for p in psutil.Process(s.proc.pid).children()
                           if p.name() == "fleetllm-coord")

        def one(k: int) -> str:
            if k == 32:
                coordinator.kill()
            with httpx.Client(headers=AUTH, timeout=120) as c:  # a connection each
                r = c.post(f"{s.url}/v1/completions", json={
                    "model": MODEL, "prompt": prompts[k], "max_tokens": 24,
                    "temperature": 0, "ignore_eos": True})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]

        with ThreadPoolExecutor(64) as pool:
            assert list(pool.map(one, range(64))) == expected
        queries = _engine_queries(s.url)
        share = queries["0"] / (queries["0"] + queries["1"])
        assert 0.4 <= share <= 0.6, queries


def test_data_parallel_ray(llama_dir: Path, reference: list[str], tmp_path: Path) -> None:
    pytest.importorskip("ray", reason="--data-parallel-backend ray needs pip install -e .[ray]")
    # Two API servers too: each attaches to actors that the supervisor's Ray session owns.
    with serve(llama_dir, tmp_path / "server.log", "--data-parallel-size", "2",
               "--data-parallel-backend", "ray", "--api-server-count", "2") as s:
        assert _complete_all(s.url) == reference
        queries = _engine_queries(s.url)
        assert sorted(queries) == ["0", "1"] and all(q > 0 for q in queries.values()), queries


@pytest.mark.parametrize("count", ["1", "2"])
def test_bad_checkpoint_fails_fast_with_the_engine_error(llama_dir: Path, tmp_path: Path,
                                                         count: str) -> None:
    cmd = [sys.executable, "-m", "fleetllm.entrypoints.cli", "serve", "--model",
           str(mismatched_checkpoint(llama_dir, tmp_path)), "--port", str(_free_port()),
           "--api-server-count", count]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=ENV)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert time.monotonic() - start < 30
    assert re.search(r"error: .*E004.*mlp", out), out[-2000:]
    assert not psutil.pid_exists(proc.pid) or psutil.Process(proc.pid).status() == "zombie"


def _tree(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def test_supervisor_tears_down_the_tree_when_an_engine_dies(llama_dir: Path,
                                                            tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    with serve(llama_dir, log, "--data-parallel-size", "2", "--api-server-count", "2",
               "--max-worker-restarts", "0") as s:
        tree = _tree(s.proc.pid)
        rest = kill_engines_mid_stream(s)
        assert any('"error"' in line for line in rest), rest[-3:]
        assert s.proc.wait(ENGINE_DEATH_GRACE_S + 20) != 0
        _, alive = psutil.wait_procs(tree, timeout=10)
        assert not alive, f"left behind: {alive}"
        assert "engine core died" in log.read_text()


def test_ctrl_c_stops_the_whole_tree(llama_dir: Path, tmp_path: Path) -> None:
    """Ctrl-C in a terminal signals the whole foreground process group."""
    port = _free_port()
    cmd = [sys.executable, "-m", "fleetllm.entrypoints.cli", "serve", "--model", str(llama_dir),
           "--port", str(port), "--kv-cache-memory-bytes", str(KV), "--api-server-count", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        tree = _tree(proc.pid)
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(30) == 0
        _, alive = psutil.wait_procs(tree, timeout=10)
        assert not alive, f"left behind: {alive}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
