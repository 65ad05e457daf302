"""Chaos: streaming requests through `fleetllm serve -tp 2` while a random worker or
engine-core process is SIGKILLed every few seconds. Zero failed requests, greedy outputs
equal to a fault-free run, and nothing left behind after SIGTERM.

Slow (3 minutes): `pytest -m "not slow"` skips it locally; CI runs it. CHAOS_SECONDS and
CHAOS_KILL_EVERY_S shorten it for a quick look.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from fleetllm import LLM, SamplingParams
from tests.test_openai_server import AUTH, KV, MAX_LEN, MODEL, serve

pytestmark = pytest.mark.slow

SECONDS = float(os.environ.get("CHAOS_SECONDS", 180))
KILL_EVERY_S = float(os.environ.get("CHAOS_KILL_EVERY_S", 20))
CONCURRENCY = 48
TOKENS = 48
PROMPTS = [f"{word} {i}" for i in range(8) for word in (
    "def fibonacci(n):", "class Point:", "import os", "Once upon a time", "x = [1, 2,",
    "for i in range(")]


def _expected(model: Path) -> dict[str, str]:
    """What a fault-free engine of the same layout (mp, tp=2) writes for each prompt."""
    with LLM(str(model), kv_cache_memory_bytes=KV, max_model_len=MAX_LEN,
             tensor_parallel_size=2) as llm:
        outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=TOKENS,
                                                    ignore_eos=True), use_tqdm=False)
    return {p: o.outputs[0].text for p, o in zip(PROMPTS, outs)}


def _stream(url: str, prompt: str) -> tuple[str, str | None, str | None]:
    """(text, finish_reason, error) of one streamed greedy completion."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": TOKENS, "temperature": 0,
            "ignore_eos": True, "stream": True}
    text, finish, error = [], None, None
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=AUTH,
                          timeout=120) as r:
            if r.status_code != 200:
                return "", None, f"HTTP {r.status_code}: {r.read()[:200]!r}"
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    error = chunk["error"]["message"]
                for choice in chunk.get("choices", []):
                    text.append(choice["text"])
                    finish = choice["finish_reason"] or finish
    except httpx.HTTPError as e:
        error = repr(e)
    return "".join(text), finish, error


def _victims(server_pid: int) -> list[psutil.Process]:
    """The engine-core process and its worker processes (not the resource tracker)."""
    found = []
    for p in psutil.Process(server_pid).children(recursive=True):
        try:
            if p.name().startswith("fleetllm-core"):
                found.append(p)
                found += [w for w in p.children()
                          if "resource_tracker" not in " ".join(w.cmdline())]
        except psutil.NoSuchProcess:
            pass
    return found


def _ours() -> set[str]:
    """Shared-memory segments, ipc socket files and their folders of fleetllm's."""
    return ({f"/dev/shm/{p.name}" for p in Path("/dev/shm").glob("*fleetllm*")}
            | {str(p) for p in Path(tempfile.gettempdir()).glob("fleetllm*")})


def test_chaos_kills_lose_no_request(llama_dir: Path, tmp_path: Path) -> None:
    expected = _expected(llama_dir)
    before = _ours()
    results: list[tuple[str, str, str | None, str | None]] = []
    kills: list[str] = []
    stop = threading.Event()
    rng = random.Random(0)
    log = tmp_path / "server.log"
    with serve(llama_dir, log, "--tensor-parallel-size", "2",
               "--max-worker-restarts", "1000") as server:

        def client(k: int) -> None:
            i = k
            while not stop.is_set():
                prompt = PROMPTS[i % len(PROMPTS)]
                results.append((prompt, *_stream(server.url, prompt)))
                i += CONCURRENCY

        def chaos() -> None:
            while not stop.wait(KILL_EVERY_S):
                victims = _victims(server.proc.pid)
                if not victims:
                    continue  # an engine core is being restarted
                victim = rng.choice(victims)
                try:
                    kills.append(victim.name())
                    victim.kill()
                except psutil.NoSuchProcess:
                    pass

        threads = [threading.Thread(target=client, args=(k,)) for k in range(CONCURRENCY)]
        killer = threading.Thread(target=chaos)
        for t in [*threads, killer]:
            t.start()
        time.sleep(SECONDS)
        stop.set()
        for t in [*threads, killer]:
            t.join(180)
        metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    failed = [(p, f, e) for p, text, f, e in results
              if e is not None or f != "length" or text != expected[p]]
    assert len(kills) >= SECONDS // KILL_EVERY_S - 1, kills
    assert results and not failed, f"{len(failed)} of {len(results)} failed: {failed[:5]}"
    assert "fleetllm:engine_restarts_total" in metrics
    left = _ours() - before
    assert not left, f"shared memory or ipc files left behind: {sorted(left)}"
