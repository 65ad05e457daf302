"""`fleetllm serve`, run as a user would and driven by the official openai client and httpx."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import psutil
import pytest

from fleetllm import SamplingParams
from fleetllm.config import EngineArgs
from fleetllm.engine.async_llm import AsyncLLM
from fleetllm.entrypoints.openai.server import ENGINE_DEATH_GRACE_S
from tests.helpers import free_ports, make_llm

KV = 1 << 24
MAX_LEN = 256
API_KEY = "test-key"
MODEL = "tiny"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
ERROR_KEYS = {"message", "type", "param", "code"}


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path

    def engine_processes(self) -> list[psutil.Process]:
        return [p for p in psutil.Process(self.proc.pid).children(recursive=True)
                if p.name().startswith("fleetllm-core")]


def _free_port() -> int:
    return free_ports(1)


@contextmanager
def serve(model: Path | None, log: Path, *extra: str,
          served_model_name: str | None = MODEL) -> Iterator[Server]:
    """A `fleetllm serve` subprocess; on exit, SIGTERM it and check it left no processes.
    model None serves the built-in model; served_model_name None leaves the default name."""
    port = _free_port()
    cmd = [sys.executable, "-m", "fleetllm.entrypoints.cli", "serve",
           *([] if model is None else ["--model", str(model)]),
           *([] if served_model_name is None else ["--served-model-name", served_model_name]),
           "--port", str(port), "--api-key", API_KEY,
           "--kv-cache-memory-bytes", str(KV), "--max-model-len", str(MAX_LEN), *extra]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=ENV)
    server = Server(f"http://127.0.0.1:{port}", proc, log)
    children: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"server exited early:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"server did not start:\n{log.read_text()}"
            try:
                if httpx.get(f"{server.url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        children = psutil.Process(proc.pid).children(recursive=True)
        yield server
    finally:
        running = proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail("the server did not stop within 30 s of SIGTERM")
        _, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, f"processes left behind: {alive}"
        if running:  # a clean stop, not a crash on the way out
            assert code == 0, f"exit code {code} after SIGTERM:\n{log.read_text()[-3000:]}"


def wait_for_unhealthy(url: str, within: float) -> None:
    start = time.monotonic()
    while httpx.get(f"{url}/health").status_code != 503:
        assert time.monotonic() - start < within, f"/health still 200 {within} s on"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def server(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serve(llama_dir, tmp_path_factory.mktemp("server") / "server.log") as s:
        yield s


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0,
                         timeout=60)


def _post(server: Server, path: str, body: dict | str, headers: dict | None = None
          ) -> httpx.Response:
    content = body if isinstance(body, str) else json.dumps(body)
    return httpx.post(f"{server.url}{path}", content=content, timeout=60,
                      headers={"Content-Type": "application/json", **AUTH, **(headers or {})})


def _token_count(server: Server, **body: object) -> int:
    r = _post(server, "/tokenize", body)
    assert r.status_code == 200, r.text
    assert r.json()["max_model_len"] == MAX_LEN
    return r.json()["count"]


def test_models_and_version(server: Server, client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]
    assert httpx.get(f"{server.url}/version", headers=AUTH).json()["version"]


def test_completion_prompt_forms_and_usage(server: Server, client: openai.OpenAI) -> None:
    extra = {"ignore_eos": True}
    r = client.completions.create(model=MODEL, prompt="def f(x):", max_tokens=5, extra_body=extra)
    assert len(r.choices) == 1 and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == _token_count(server, prompt="def f(x):")
    assert r.usage.completion_tokens == 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + 5

    r = client.completions.create(model=MODEL, prompt=["class Point:", "The quick"], n=2,
                                  max_tokens=3, temperature=0.8, seed=1, extra_body=extra)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert r.usage.prompt_tokens == (_token_count(server, prompt="class Point:")
                                     + _token_count(server, prompt="The quick"))
    assert r.usage.completion_tokens == 2 * 2 * 3

    r = client.completions.create(model=MODEL, prompt=[[5, 6, 7], [8, 9]], max_tokens=2,
                                  extra_body=extra)
    assert len(r.choices) == 2 and r.usage.prompt_tokens == 5
    assert r.usage.completion_tokens == 4


def test_greedy_matches_llm(server: Server, client: openai.OpenAI, llama_dir: Path) -> None:
    messages = [{"role": "user", "content": "def fibonacci(n):"}]
    llm = make_llm(llama_dir, kv_cache_memory_bytes=KV, max_model_len=MAX_LEN)
    try:
        params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        want = llm.generate("The quick brown fox", params, use_tqdm=False)[0].outputs[0].text
        want_chat = llm.chat(messages, params, use_tqdm=False)[0].outputs[0].text
    finally:
        llm.shutdown()
    r = client.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=12,
                                  temperature=0, extra_body={"ignore_eos": True})
    assert r.choices[0].text == want
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12,
                                       temperature=0, extra_body={"ignore_eos": True})
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want_chat
    assert r.usage.prompt_tokens == _token_count(server, messages=messages)


def test_logprobs(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt="x = ", max_tokens=4, logprobs=2,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(v <= 0 for v in lp.token_logprobs)
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=4, logprobs=True, top_logprobs=2,
                                       extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 4
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)


def test_streaming_completion(client: openai.OpenAI) -> None:
    kwargs = dict(model=MODEL, prompt="The quick brown fox", max_tokens=24, temperature=0,
                  extra_body={"ignore_eos": True})
    whole = client.completions.create(**kwargs).choices[0].text
    chunks = list(client.completions.create(
        stream=True, stream_options={"include_usage": True}, **kwargs))
    streamed = [c for c in chunks if c.choices]
    assert len(streamed) >= 2, "the answer must arrive in pieces, before the end"
    assert "".join(c.choices[0].text for c in streamed) == whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 24


def test_streaming_chat(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "tell me"}], max_tokens=24,
        temperature=0, stream=True, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len([c for c in chunks[1:] if c.choices]) >= 2
    assert chunks[-1].choices[0].finish_reason == "length"


GOOD = {"model": MODEL, "prompt": "hello", "max_tokens": 2}
BAD_REQUESTS = {
    "malformed_json": ("/v1/completions", '{"prompt": "x",', None, 400),
    "negative_max_tokens": ("/v1/completions", {**GOOD, "max_tokens": -1}, None, 400),
    "nan_temperature": ("/v1/completions", '{"prompt": "x", "temperature": NaN}', None, 400),
    "top_p_2": ("/v1/completions", {**GOOD, "top_p": 2}, None, 400),
    "too_long": ("/v1/completions", {**GOOD, "prompt": [5] * MAX_LEN}, None, 400),
    "unknown_model": ("/v1/completions", {**GOOD, "model": "gpt-4"}, None, 404),
    "empty_messages": ("/v1/chat/completions", {"model": MODEL, "messages": []}, None, 400),
    "missing_key": ("/v1/completions", GOOD, {"Authorization": ""}, 401),
    "wrong_key": ("/v1/completions", GOOD, {"Authorization": "Bearer nope"}, 401),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_then_good_one(server: Server, case: str) -> None:
    path, body, headers, status = BAD_REQUESTS[case]
    r = _post(server, path, body, headers)
    assert r.status_code == status, r.text
    assert set(r.json()["error"]) == ERROR_KEYS and r.json()["error"]["message"]
    good = _post(server, "/v1/completions", GOOD)
    assert good.status_code == 200, good.text


def test_openai_client_raises_typed_errors(server: Server, client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="x", top_p=2)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x")
    anonymous = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anonymous.models.list()


def test_probes_are_open_and_metrics_named(server: Server, client: openai.OpenAI) -> None:
    client.completions.create(model=MODEL, prompt="metrics", max_tokens=3)
    assert httpx.get(f"{server.url}/health").status_code == 200
    r = httpx.get(f"{server.url}/metrics")
    assert r.status_code == 200
    for name in ("fleetllm:num_requests_running", "fleetllm:num_requests_waiting",
                 "fleetllm:kv_cache_usage_perc", "fleetllm:prompt_tokens_total",
                 "fleetllm:generation_tokens_total", "fleetllm:time_to_first_token_seconds",
                 "fleetllm:inter_token_latency_seconds", "fleetllm:e2e_request_latency_seconds",
                 "fleetllm:prefix_cache_hits_total"):
        assert name in r.text, name
    assert _post(server, "/detokenize", {"tokens": [5, 6]}).json()["prompt"]


def kill_engines_mid_stream(server: Server) -> list[str]:
    """Starts a long stream, kills every engine core once it has begun, checks /health turns
    503 within 2 s, and returns the stream's remaining `data:` lines."""
    body = {"model": MODEL, "prompt": "x", "max_tokens": MAX_LEN - 2, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=AUTH,
                      timeout=10) as stream:
        lines = stream.iter_lines()
        assert next(line for line in lines if line.startswith("data: {"))
        engines = server.engine_processes()
        assert engines
        for engine in engines:
            engine.suspend()  # so the request is surely still in flight when they die
        for engine in engines:
            engine.kill()
        wait_for_unhealthy(server.url, within=2.0)
        return [line for line in lines if line.startswith("data: ")]


def test_engine_death_fails_health_and_streams(llama_dir: Path, tmp_path: Path) -> None:
    with serve(llama_dir, tmp_path / "server.log", "--max-worker-restarts", "0") as server:
        rest = kill_engines_mid_stream(server)
        assert any('"error"' in line for line in rest), rest[-3:]
        assert rest[-1] == "data: [DONE]"
        assert _post(server, "/v1/completions", GOOD).status_code == 503
        # Then the server stops by itself, saying why, and leaves nothing behind.
        assert server.proc.wait(ENGINE_DEATH_GRACE_S + 10) == 1
        assert "exited with code -9" in server.log.read_text()


def test_async_llm_aborts_closed_and_aborted_requests(llama_dir: Path) -> None:
    async def run(llm: AsyncLLM) -> None:
        ids = llm.encode("def f(x):")
        long = SamplingParams(max_tokens=200, ignore_eos=True)
        stream = llm.generate(ids, long, "closed")
        await anext(stream)
        await stream.aclose()  # what the server does when a client disconnects
        assert not llm.engine_core.engine_of

        async def last(request_id: str) -> object:
            out = None
            async for out in llm.generate(ids, long, request_id):
                if out.outputs[0].token_ids:
                    await llm.abort(request_id)
            return out

        final = await last("aborted")
        assert final.finished and final.outputs[0].finish_reason == "abort"
        assert not llm.engine_core.engine_of
        (stats,) = await llm.get_stats()
        assert stats["num_running"] == stats["num_waiting"] == 0

    llm = AsyncLLM.from_engine_args(EngineArgs(model=str(llama_dir), kv_cache_memory_bytes=KV))
    try:
        asyncio.run(run(llm))
    finally:
        llm.shutdown()
    assert not any(p.is_alive() for p in llm.engine_core.proc_manager.processes)
