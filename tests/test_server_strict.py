"""`fleetllm serve`, strict and complete: every bad input gets a 4xx in the OpenAI shape that
names what to change (and the next request succeeds), nobody waits for a bad or large one,
scoring with echo, graceful shutdown, and an OpenAPI schema that schemathesis holds it to."""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from fleetllm import SamplingParams
from fleetllm.default_model import DEFAULT_MODEL_DIR
from fleetllm.entrypoints.openai.protocol import DEPRECATED, NOT_SUPPORTED_YET
from tests.conftest import TEXT
from tests.helpers import VOCAB, hf_logprobs, make_llm, random_prompts
from tests.test_openai_server import (
    API_KEY,
    AUTH,
    ERROR_KEYS,
    KV,
    MAX_LEN,
    MODEL,
    Server,
    _post,
    serve,
)

GOOD = {"model": MODEL, "prompt": "hello", "max_tokens": 2}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
BIG = (TEXT * (10_000_000 // len(TEXT) + 1))[:10_000_000]  # 10 MB of text


class SlowSteps:
    """Worker extension: every step takes 30 ms more, so streams outlast a shutdown."""

    def execute_model(self, so):  # type: ignore[no-untyped-def]
        time.sleep(0.03)
        return super().execute_model(so)


@pytest.fixture(scope="module")
def server(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server with the default limits whose worker runs out of memory on a request of
    more than 150 tokens (tests.test_recovery.OutOfMemoryAbove); every other test here
    stays below that."""
    log = tmp_path_factory.mktemp("strict") / "server.log"
    with serve(llama_dir, log, "--worker-extension-cls",
               "tests.test_recovery.OutOfMemoryAbove") as s:
        yield s


def _error(r: httpx.Response, status: int = 400) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body["error"]) == ERROR_KEYS and body["error"]["message"], body
    return body["error"]


def _next_one_succeeds(server: Server) -> None:
    r = _post(server, "/v1/completions", GOOD)
    assert r.status_code == 200, r.text


def _raw(body: dict[str, Any]) -> str:
    """JSON as a client writes it; json.dumps keeps a lone surrogate as a \\ud800 escape."""
    return json.dumps(body)


def _chat(content: Any) -> dict[str, Any]:
    return {**CHAT, "messages": [{"role": "user", "content": content}]}


# id -> (path, body, the field the error must name)
BAD: dict[str, tuple[str, dict[str, Any], str]] = {
    "surrogate_prompt": ("/v1/completions", {**GOOD, "prompt": "a\ud800b"}, "prompt"),
    "surrogate_prompt_list": ("/v1/completions", {**GOOD, "prompt": ["ok", "\udfff"]},
                              "prompt"),
    "surrogate_chat": ("/v1/chat/completions", _chat("x\ud800"), "messages"),
    "surrogate_chat_part": ("/v1/chat/completions",
                            _chat([{"type": "text", "text": "\ud83d"}]), "messages"),
    "surrogate_stop": ("/v1/completions", {**GOOD, "stop": "\ud800"}, "stop"),
    "surrogate_stop_list": ("/v1/chat/completions", {**CHAT, "stop": ["ok", "\ud800"]},
                            "stop"),
    # pydantic refuses a key that is not valid Unicode before any field is read
    "surrogate_key": ("/v1/completions", {**GOOD, "\ud800": 1}, "unicode string"),
    "seed_2_70": ("/v1/completions", {**GOOD, "seed": 2**70}, "seed"),
    "kv_transfer_unknown_key": ("/v1/completions",
                                {**GOOD, "kv_transfer_params": {"huge": 2**70}},
                                "kv_transfer_params"),
    "kv_transfer_bad_id": ("/v1/chat/completions",
                           {**CHAT, "kv_transfer_params": {"transfer_id": 5}},
                           "kv_transfer_params"),
    "seed_minus_2_70": ("/v1/chat/completions", {**CHAT, "seed": -(2**70)}, "seed"),
    "huge_stop_token_id": ("/v1/completions", {**GOOD, "stop_token_ids": [10**20]},
                           "stop_token_ids"),
    "negative_stop_token_id": ("/v1/completions", {**GOOD, "stop_token_ids": [-1]},
                               "stop_token_ids"),
    "stop_token_id_outside_vocab": ("/v1/chat/completions", {**CHAT, "stop_token_ids": [VOCAB]},
                                    "stop_token_ids"),
    "negative_prompt_id": ("/v1/completions", {**GOOD, "prompt": [5, -1]}, "prompt"),
    "prompt_id_outside_vocab": ("/v1/completions", {**GOOD, "prompt": [[5], [VOCAB]]},
                                "prompt"),
    "huge_prompt_id": ("/v1/completions", {**GOOD, "prompt": [10**20]}, "prompt"),
    "n_above_cap": ("/v1/completions", {**GOOD, "n": 129}, "n"),
    "chat_n_above_cap": ("/v1/chat/completions", {**CHAT, "n": 129}, "n"),
    "unknown_role": ("/v1/chat/completions",
                     {**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    "image_part": ("/v1/chat/completions",
                   _chat([{"type": "image_url", "image_url": {"url": "x"}}]), "messages"),
    "unknown_field": ("/v1/completions", {**GOOD, "wat": 1}, "wat"),
    "openai_field_not_implemented": ("/v1/chat/completions",
                                     {**CHAT, "reasoning_effort": "low"}, "reasoning_effort"),
    "string_for_int": ("/v1/completions", {**GOOD, "n": "2"}, "n"),
    "float_for_int": ("/v1/completions", {**GOOD, "max_tokens": 1.5}, "max_tokens"),
    "string_for_bool": ("/v1/chat/completions", {**CHAT, "stream": "yes"}, "stream"),
    "max_tokens_0_without_echo": ("/v1/completions", {**GOOD, "max_tokens": 0}, "max_tokens"),
    "suffix": ("/v1/completions", {**GOOD, "suffix": "end"}, "suffix"),
    "empty_prompt": ("/v1/completions", {**GOOD, "prompt": []}, "prompt"),
    "empty_guided_choice": ("/v1/chat/completions", {**CHAT, "guided_choice": []}, "choice"),
    # tool_choice "auto" (the default with tools) needs --enable-auto-tool-choice
    "auto_tools_without_parser": ("/v1/chat/completions", {**CHAT, "tools": [
        {"type": "function", "function": {"name": "f"}}]}, "--enable-auto-tool-choice"),
    "auto_tool_choice_without_parser": ("/v1/chat/completions", {**CHAT, "tool_choice": "auto",
        "tools": [{"type": "function", "function": {"name": "f"}}]}, "tool_choice"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gets_400_naming_the_field(server: Server, case: str) -> None:
    path, body, field = BAD[case]
    error = _error(_post(server, path, _raw(body)))
    assert field in (error["param"] or "") or field in error["message"], error
    _next_one_succeeds(server)


def _unsupported_value(name: str) -> Any:
    return {"function_call": "auto"}.get(name, [{"x": 1}])


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("name", sorted(NOT_SUPPORTED_YET | DEPRECATED.keys()))
def test_fields_not_supported_get_400_naming_them(server: Server, path: str, name: str) -> None:
    base = GOOD if path == "/v1/completions" else CHAT
    error = _error(_post(server, path, {**base, name: _unsupported_value(name)}))
    why = "not supported yet" if name in NOT_SUPPORTED_YET else f"send {DEPRECATED[name]}"
    assert error["param"] == name and why in error["message"], error
    _next_one_succeeds(server)


def test_deprecated_function_call_in_a_message_gets_400(server: Server) -> None:
    message = {"role": "assistant", "content": "x",
               "function_call": {"name": "f", "arguments": "{}"}}
    error = _error(_post(server, "/v1/chat/completions", {**CHAT, "messages": [message]}))
    assert error["param"] == "messages[].function_call", error
    assert "send tool_calls" in error["message"], error
    _next_one_succeeds(server)


@pytest.mark.parametrize("extra", [{"logit_bias": {}}, {"tools": []}, {"tool_choice": "none"},
                                   {"response_format": {"type": "text"}},
                                   {"response_format": None}, {"user": "u-1"}])
def test_empty_or_default_values_of_those_fields_are_accepted(server: Server,
                                                              extra: dict[str, Any]) -> None:
    r = _post(server, "/v1/chat/completions", {**CHAT, **extra})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("chunked", [False, True])
def test_a_20_mb_body_gets_413_within_a_second(server: Server, chunked: bool) -> None:
    body = json.dumps({**GOOD, "prompt": "x" * 20_000_000}).encode()

    def pieces() -> Iterator[bytes]:  # no Content-Length: the server counts as it reads
        for i in range(0, len(body), 1 << 16):
            yield body[i:i + (1 << 16)]

    start = time.monotonic()
    r = httpx.post(f"{server.url}/v1/completions", content=pieces() if chunked else body,
                   headers={**AUTH, "Content-Type": "application/json"}, timeout=30)
    elapsed = time.monotonic() - start
    error = _error(r, 413)
    assert "--max-request-body-bytes" in error["message"]
    assert elapsed < 1.0, f"413 took {elapsed:.2f} s"
    _next_one_succeeds(server)


def _timed(fn: Any) -> float:
    start = time.monotonic()
    fn()
    return time.monotonic() - start


def test_liveness_while_a_10_mb_prompt_is_tokenized(server: Server) -> None:
    """/tokenize encodes all of it (no max_model_len there), off the event loop; a
    completion with it is refused before it is encoded; memory falls back afterwards."""
    def short() -> None:
        assert _post(server, "/v1/completions", {**GOOD, "max_tokens": 4}).status_code == 200

    baseline = min(_timed(short) for _ in range(3))
    proc = psutil.Process(server.proc.pid)
    rss_before = proc.memory_info().rss
    result: dict[str, Any] = {}
    body = json.dumps({"prompt": BIG})  # here, not in the thread: it would hold our GIL

    def tokenize() -> None:
        result["response"] = _post(server, "/tokenize", body)

    worker = threading.Thread(target=tokenize)
    # A full collection of this process's heap (transformers and all) holds our own GIL
    # for half a second: that is not the server's latency.
    gc.collect()
    gc.freeze()
    try:
        worker.start()
        time.sleep(0.5)  # the body is sent and being encoded
        health = []
        peak = rss_before
        while worker.is_alive() and len(health) < 20:
            health.append(_timed(lambda: httpx.get(f"{server.url}/health", timeout=5)))
            peak = max(peak, proc.memory_info().rss)
            time.sleep(0.05)
        completion = _timed(short)
    finally:
        gc.unfreeze()
    assert worker.is_alive(), "tokenizing finished before the checks: not a test of them"
    worker.join(120)
    assert result["response"].status_code == 200
    assert result["response"].json()["count"] > 1_000_000
    assert max(health) < 0.2, f"/health took up to {max(health) * 1000:.0f} ms: {health}"
    assert completion < max(1.0, 3 * baseline), (completion, baseline)

    start = time.monotonic()
    error = _error(_post(server, "/v1/completions", {**GOOD, "prompt": BIG}))
    assert time.monotonic() - start < 1.0 and error["code"] == "context_length_exceeded"
    time.sleep(0.5)
    rss_after = proc.memory_info().rss
    # glibc keeps freed heap pages unless trimmed: without malloc_trim about 60% of the
    # peak's extra stays resident, with it about 30%.
    assert rss_after - rss_before < 0.45 * (peak - rss_before), (rss_before, peak, rss_after)


def test_engine_error_becomes_an_error_for_that_request(server: Server) -> None:
    """A request out of memory even alone (E001) is the client's size problem: 400, not
    500, with the engine's message; a stream gets an error event, then [DONE]."""
    body = {**GOOD, "prompt": random_prompts((200,), seed=8)[0], "max_tokens": 4}
    error = _error(_post(server, "/v1/completions", body))
    assert error["code"] == "out_of_memory" and "E001" in error["message"]
    with httpx.stream("POST", f"{server.url}/v1/completions", json={**body, "stream": True},
                      headers=AUTH, timeout=60) as r:
        assert r.status_code == 200
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["error"]["code"] == "out_of_memory", events
    _next_one_succeeds(server)


# ---- scoring ----------------------------------------------------------------------------

def _prompt_logprobs(llama_dir: Path, prompts: list[list[int]]) -> list[list[float]]:
    llm = make_llm(llama_dir, kv_cache_memory_bytes=KV, max_model_len=MAX_LEN)
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(prompt_logprobs=1, max_tokens=1), use_tqdm=False)
    finally:
        llm.shutdown()
    return [[entry[tok].logprob for entry, tok in zip(o.prompt_logprobs[1:], p[1:])]
            for o, p in zip(outs, prompts)]


def test_echo_scoring_matches_offline_and_transformers(server: Server,
                                                       llama_dir: Path) -> None:
    prompts = random_prompts((12, 30), seed=3)
    r = _post(server, "/v1/completions", {"model": MODEL, "prompt": prompts, "echo": True,
                                          "logprobs": 1, "max_tokens": 0, "temperature": 0})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["usage"] == {"prompt_tokens": 42, "completion_tokens": 0, "total_tokens": 42}
    offline = _prompt_logprobs(llama_dir, prompts)
    for choice, ids, want in zip(sorted(out["choices"], key=lambda c: c["index"]), prompts,
                                 offline):
        lp = choice["logprobs"]
        assert choice["finish_reason"] == "length"
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(ids)
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        hf = hf_logprobs(llama_dir, ids)
        for i, got in enumerate(lp["token_logprobs"][1:]):
            assert math.isclose(got, want[i], abs_tol=1e-4)
            assert math.isclose(got, hf[i, ids[i + 1]].item(), abs_tol=1e-4)
            assert len(lp["top_logprobs"][i + 1]) in (1, 2)  # the prompt token and top-1
        # The offsets walk through the tokens' texts (random ids cut UTF-8 characters in
        # two, so the echoed text need not be their concatenation).
        assert choice["text"]
        offsets = [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(ids))]
        assert lp["text_offset"] == offsets


def test_echo_of_a_text_prompt_with_generated_tokens(server: Server) -> None:
    prompt = "def fibonacci(n):"
    r = _post(server, "/v1/completions", {**GOOD, "prompt": prompt, "echo": True,
                                          "logprobs": 2, "max_tokens": 3, "ignore_eos": True})
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    n = r.json()["usage"]["prompt_tokens"]
    assert choice["text"].startswith(prompt) and len(lp["tokens"]) == n + 3
    assert all(v is not None for v in lp["token_logprobs"][1:])
    assert lp["text_offset"][n] == len(prompt)  # the generated text starts after the prompt
    streamed = []
    with httpx.stream("POST", f"{server.url}/v1/completions", headers=AUTH, timeout=60,
                      json={**GOOD, "prompt": prompt, "echo": True, "stream": True}) as s:
        for line in s.iter_lines():
            if line.startswith("data: {"):
                streamed.append(json.loads(line[6:])["choices"][0]["text"])
    assert streamed[0] == prompt


def _lm_eval_parse(out: dict[str, Any], ctxlens: list[int]) -> list[tuple[float, bool]]:
    """lm-eval's local-completions parse_logprobs: the continuation's tokens are those
    after the context, but for the last (the one generated with max_tokens=1)."""
    res = []
    for choice, ctxlen in zip(sorted(out["choices"], key=lambda c: c["index"]), ctxlens):
        assert ctxlen > 0
        logprobs = sum(choice["logprobs"]["token_logprobs"][ctxlen:-1])
        tokens_logprobs = choice["logprobs"]["token_logprobs"][ctxlen:-1]
        top_logprobs = choice["logprobs"]["top_logprobs"][ctxlen:-1]
        is_greedy = all(tok == max(top.values()) for tok, top in zip(tokens_logprobs,
                                                                       top_logprobs))
        assert choice["logprobs"]["tokens"] and choice["logprobs"]["text_offset"]
        res.append((logprobs, is_greedy))
    return res


def test_lm_eval_local_completions_request_parses(server: Server, llama_dir: Path) -> None:
    contexts, continuations = random_prompts((10, 20), seed=11), random_prompts((3, 5), seed=12)
    prompts = [c + k for c, k in zip(contexts, continuations)]
    payload = {"model": MODEL, "prompt": prompts, "temperature": 0, "max_tokens": 1,
               "logprobs": 1, "seed": 1234, "echo": True}
    r = httpx.post(f"{server.url}/v1/completions", json=payload, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    parsed = _lm_eval_parse(r.json(), [len(c) for c in contexts])
    for (logprob, _), ctx, ids in zip(parsed, contexts, prompts):
        hf = hf_logprobs(llama_dir, ids)
        want = sum(hf[i - 1, ids[i]].item() for i in range(len(ctx), len(ids)))
        assert math.isclose(logprob, want, abs_tol=1e-3)
    # The string form (tokenized_requests=False), with max_tokens=0 as other harnesses send.
    text = {**payload, "prompt": ["The quick brown fox", "def f(x):"], "max_tokens": 0}
    r = httpx.post(f"{server.url}/v1/completions", json=text, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    assert [c["text"] for c in r.json()["choices"]] == text["prompt"]


# ---- shutdown ---------------------------------------------------------------------------

def _read_stream(url: str, body: dict[str, Any], out: list[str], started: threading.Event
                 ) -> None:
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=AUTH,
                      timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                out.append(line)
                started.set()


@pytest.mark.parametrize("servers", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_sigterm_drains_then_ends_the_streams_left(llama_dir: Path, tmp_path: Path,
                                                   servers: int) -> None:
    timeout = 4.0
    short = {"model": MODEL, "prompt": "x", "max_tokens": 40, "ignore_eos": True,
             "stream": True}  # about 1.5 s of steps
    long = {**short, "max_tokens": MAX_LEN - 10}  # about 8 s
    with serve(llama_dir, tmp_path / "server.log", "--shutdown-timeout", str(timeout),
               "--api-server-count", str(servers),
               "--worker-extension-cls", "tests.test_server_strict.SlowSteps") as s:
        tree = psutil.Process(s.proc.pid).children(recursive=True)
        outs: list[list[str]] = [[] for _ in range(16)]
        started = [threading.Event() for _ in range(16)]
        threads = [threading.Thread(target=_read_stream,
                                    args=(s.url, short if i < 8 else long, outs[i], started[i]))
                   for i in range(16)]
        for t in threads:
            t.start()
        assert all(e.wait(30) for e in started)
        s.proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        while httpx.get(f"{s.url}/health", timeout=5).status_code != 503:
            assert time.monotonic() - sent < 2, "still healthy 2 s after SIGTERM"
        error = _error(_post(s, "/v1/completions", GOOD), 503)
        assert error["code"] == "shutting_down"
        for t in threads:
            t.join(timeout + 20)
        code = s.proc.wait(timeout + 20)
        stopped = time.monotonic() - sent
        _, alive = psutil.wait_procs(tree, timeout=10)
    assert code == 0 and not alive, (code, alive)
    assert timeout <= stopped < timeout + 15, stopped
    for lines in outs[:8]:  # finished within the timeout: complete
        assert lines[-1] == "data: [DONE]" and not any('"error"' in x for x in lines)
        chunks = [json.loads(x[6:]) for x in lines[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    for lines in outs[8:]:  # cut: an error event, then [DONE]
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2][6:])["error"]["code"] == "shutting_down", lines[-3:]


# ---- command line -----------------------------------------------------------------------

def test_builtin_model_is_fleetllm_default_in_fleetllm_api0(tmp_path: Path) -> None:
    with serve(None, tmp_path / "server.log", served_model_name=None) as s:
        r = httpx.get(f"{s.url}/v1/models", headers=AUTH)
        assert [m["id"] for m in r.json()["data"]] == ["fleetllm-default"]
        assert str(DEFAULT_MODEL_DIR) not in r.text  # the install path does not leak
        assert _post(s, "/v1/completions", {**GOOD, "model": "fleetllm-default"}
                     ).status_code == 200
        assert psutil.Process(s.proc.pid).name() == "fleetllm-api0"


# ---- OpenAPI ----------------------------------------------------------------------------

def test_openapi_documents_the_errors_and_content_types(server: Server) -> None:
    schema = httpx.get(f"{server.url}/openapi.json", headers=AUTH).json()
    ops = schema["paths"]["/v1/completions"]["post"]["responses"]
    assert {"400", "401", "404", "413", "503"} <= ops.keys() and "422" not in ops
    assert ops["400"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "ErrorResponse")
    assert "text/event-stream" in ops["200"]["content"]
    assert "text/plain" in schema["paths"]["/health"]["get"]["responses"]["200"]["content"]
    assert "text/plain" in httpx.get(f"{server.url}/metrics").headers["content-type"]
    r = httpx.put(f"{server.url}/v1/completions", headers=AUTH)
    assert r.status_code == 405 and r.headers["allow"] == "POST"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("schemathesis") is None,
                    reason="schemathesis is in the test extra: pip install -e .[test]")
def test_schemathesis_finds_no_5xx_and_no_schema_violation(llama_dir: Path,
                                                           tmp_path: Path) -> None:
    """Every check but positive_data_acceptance, which wants every schema-valid request
    accepted: requests can be valid in shape and still wrong for the engine (a prompt too
    long for max_model_len, min_tokens above max_tokens), and get 400 for it. A small
    --max-n and max_model_len keep generated requests quick."""
    with serve(llama_dir, tmp_path / "server.log", "--max-n", "4", "--max-model-len",
               "64") as s:
        cmd = ["schemathesis", "run", f"{s.url}/openapi.json", "--checks", "all",
               "--exclude-checks", "positive_data_acceptance", "--max-examples", "25",
               "--seed", "1", "--workers", "1", "--request-timeout", "30",
               "--header", f"Authorization: Bearer {API_KEY}", "--no-shrink"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path,
                           env={**os.environ, "NO_COLOR": "1"})  # its cache goes to cwd
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert "No issues found" in r.stdout


class SlowStep:
    """Worker extension: every step takes 3 s (a stand-in for a stuck uni worker)."""

    def execute_model(self, scheduler_output):  # type: ignore[no-untyped-def]
        if scheduler_output.total_num_scheduled_tokens:
            time.sleep(3)
        return super().execute_model(scheduler_output)


def test_health_is_503_while_a_step_runs_past_the_hang_timeout(llama_dir: Path,
                                                               tmp_path: Path) -> None:
    with serve(llama_dir, tmp_path / "server.log", "--execute-model-timeout-s", "1",
               "--worker-extension-cls", "tests.test_server_strict.SlowStep") as s:
        body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
        slow = threading.Thread(target=lambda: httpx.post(
            f"{s.url}/v1/completions", json=body, headers=AUTH, timeout=60))
        slow.start()
        try:
            deadline = time.monotonic() + 10
            while (r := httpx.get(f"{s.url}/health", timeout=5)).status_code != 503:
                assert time.monotonic() < deadline, "never 503 during a 3 s step"
                time.sleep(0.1)
            assert "engine_hung" in r.text
        finally:
            slow.join(60)
        assert httpx.get(f"{s.url}/health", timeout=5).status_code == 200  # progress again


# ---- logit_bias and structured outputs through the server ----------------------------------

def _banned_offline(model: Path, token: int) -> Any:
    with make_llm(model) as llm:
        return llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(
            temperature=0, max_tokens=6, ignore_eos=True, logit_bias={token: -100}),
            use_tqdm=False)[0].outputs[0]


def test_logit_bias_forces_and_bans_a_token(server: Server, llama_dir: Path) -> None:
    body = {**GOOD, "prompt": [5, 6, 7], "max_tokens": 6, "temperature": 1.0, "seed": 3,
            "logprobs": 0}
    forced = _post(server, "/v1/completions", {**body, "logit_bias": {"42": 100}}).json()
    tokens = forced["choices"][0]["logprobs"]["tokens"]
    assert len(set(tokens)) == 1, tokens  # every sampled token is token 42
    with make_llm(llama_dir) as llm:  # the server's weights: its greedy tokens, by id
        greedy_ids = llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(
            temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    first = greedy_ids.token_ids[0]
    out = _post(server, "/v1/completions", {**body, "temperature": 0,
                                            "logit_bias": {str(first): -100}}).json()
    free = _post(server, "/v1/completions", {**body, "temperature": 0}).json()
    assert free["choices"][0]["text"] == greedy_ids.text  # the same model as offline
    assert out["choices"][0]["text"] != greedy_ids.text
    offline = _banned_offline(llama_dir, first)
    assert first not in offline.token_ids and out["choices"][0]["text"] == offline.text
    for bad in ({"42": 101}, {"99999": 1}, {"x": 1}):
        assert _post(server, "/v1/completions", {**body, "logit_bias": bad}).status_code == 400


SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0,
                                                 "maximum": 99},
                                           "ok": {"type": "boolean"}},
          "required": ["n", "ok"], "additionalProperties": False}


@pytest.mark.parametrize("extra", [
    {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}},
    {"guided_json": SCHEMA}, {"structured_outputs": {"json": SCHEMA}}])
def test_json_schema_output_validates(server: Server, extra: dict[str, Any]) -> None:
    import jsonschema

    r = _post(server, "/v1/chat/completions", {**CHAT, "max_tokens": 150, "temperature": 1.0,
                                               "seed": 1, **extra})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMA)
    assert choice["finish_reason"] == "stop"


def test_json_object_regex_and_choice_hold(server: Server) -> None:
    import re

    obj = _post(server, "/v1/completions", {**GOOD, "max_tokens": 60, "temperature": 1.0,
                                            "seed": 2,
                                            "response_format": {"type": "json_object"}})
    assert obj.status_code == 200, obj.text
    text = obj.json()["choices"][0]["text"]
    if obj.json()["choices"][0]["finish_reason"] == "stop":
        assert isinstance(json.loads(text), dict)
    regex = _post(server, "/v1/completions", {**GOOD, "max_tokens": 20, "temperature": 1.0,
                                              "guided_regex": "[a-c]{3}-[0-9]{2}"}).json()
    assert re.fullmatch("[a-c]{3}-[0-9]{2}", regex["choices"][0]["text"])
    choice = _post(server, "/v1/completions", {**GOOD, "max_tokens": 20,
                                               "guided_choice": ["yes", "no"]}).json()
    assert choice["choices"][0]["text"] in ("yes", "no")


@pytest.mark.parametrize("extra,param", [
    ({"guided_json": {"type": "foo"}}, "guided_json"),
    ({"guided_regex": "("}, "guided_regex"),
    ({"guided_regex": "a", "guided_choice": ["b"]}, None),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "xml"}}, None)])
def test_bad_structured_outputs_get_400(server: Server, extra: dict[str, Any],
                                        param: str | None) -> None:
    r = _post(server, "/v1/completions", {**GOOD, **extra})
    assert r.status_code == 400, r.text
    _next_one_succeeds(server)
