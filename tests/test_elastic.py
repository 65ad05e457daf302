"""Elastic data parallel on engine processes (mp): the fleet grows and shrinks while it
serves, offline (LLM.scale_data_parallel) and over HTTP (POST /scale_elastic_ep), with the
same greedy outputs, no failed request, the cores re-split, and nothing left of removed
engines. The Ray side (a node added after start, a scale that cannot be placed, node loss)
is in test_ray_cluster.py."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from fleetllm import SamplingParams
from fleetllm.distributed.reconfigure import available_cores
from fleetllm.engine.messages import EngineCoreRequest
from fleetllm.errors import ScaleInProgressError
from tests.helpers import generate_ids, greedy, make_llm, random_prompts
from tests.test_openai_server import AUTH, MODEL, serve

KV = 1 << 24


class ThreadCount:
    """Worker extension: the worker's torch thread count."""

    def num_threads(self) -> int:
        import torch

        return torch.get_num_threads()


def _engines_alive() -> list[str]:
    return sorted(p.name() for p in psutil.Process().children(recursive=True)
                  if p.is_running() and p.name().startswith("fleetllm-core"))


def _wait_engines(expected: list[str], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while _engines_alive() != expected:
        assert time.monotonic() < deadline, _engines_alive()
        time.sleep(0.05)


def test_offline_scale_up_and_down_keeps_outputs_and_resplits_cores(
        llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # fleetllm chooses the threads
    prompts = random_prompts()
    llm = make_llm(llama_dir, kv_cache_memory_bytes=KV, engine_process=True,
                   worker_extension_cls="tests.test_elastic.ThreadCount")
    try:
        base = generate_ids(llm, prompts, greedy(16))
        llm.scale_data_parallel(3)
        assert llm.data_parallel_size == 3
        _wait_engines(["fleetllm-core0", "fleetllm-core1", "fleetllm-core2"])
        assert llm.collective_rpc("num_threads") == [max(1, available_cores() // 3)] * 3
        assert generate_ids(llm, prompts, greedy(16)) == base
        # every engine got work, the new ones too
        assert all(s["prefix_cache_queries"] > 0
                   for s in llm.engine_core.call_utility("stats"))
        llm.scale_data_parallel(2)
        _wait_engines(["fleetllm-core0", "fleetllm-core1"])
        assert llm.collective_rpc("num_threads") == [max(1, available_cores() // 2)] * 2
        assert generate_ids(llm, prompts, greedy(16)) == base
        llm.scale_data_parallel(1)
        _wait_engines(["fleetllm-core0"])
        assert llm.collective_rpc("num_threads") == [available_cores()]
        assert generate_ids(llm, prompts, greedy(16)) == base
        llm.scale_data_parallel(2)  # an index used before comes back as a new engine
        assert generate_ids(llm, prompts, greedy(16)) == base
    finally:
        llm.shutdown()
    _wait_engines([])


def test_scale_down_moves_unfinished_requests_to_the_engines_left(llama_dir: Path) -> None:
    """drain_timeout=0: the removed engine's requests are re-sent mid-generation with the
    tokens they already delivered, and finish with the same greedy tokens."""
    prompts = random_prompts(tuple(5 + 3 * i for i in range(8)), seed=3)
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
    with make_llm(llama_dir, kv_cache_memory_bytes=KV) as ref:
        expected = generate_ids(ref, prompts, params)
    llm = make_llm(llama_dir, kv_cache_memory_bytes=KV, data_parallel_size=2)
    try:
        client = llm.engine_core
        for k, prompt in enumerate(prompts):
            client.add_request(EngineCoreRequest(str(k), prompt, params, []))
        tokens: dict[str, list[int]] = {str(k): [] for k in range(len(prompts))}
        while sum(map(len, tokens.values())) < 40:  # some tokens on both engines
            for eo in client.step():
                tokens[eo.request_id].extend(eo.new_token_ids)
        on_1 = [rid for rid, engine in client.engine_of.items() if engine == 1]
        assert on_1
        client.scale_data_parallel(1, drain_timeout=0)
        assert client.num_requests_migrated == len(on_1)
        while client.has_unfinished_requests():
            for eo in client.step():
                tokens[eo.request_id].extend(eo.new_token_ids)
        assert [tokens[str(k)] for k in range(len(prompts))] == expected
        _wait_engines(["fleetllm-core0"])
    finally:
        llm.shutdown()


def test_bad_scales_say_what_to_change(llama_dir: Path) -> None:
    with make_llm(llama_dir, kv_cache_memory_bytes=KV) as llm:
        with pytest.raises(ValueError, match="engine_process=True"):
            llm.scale_data_parallel(2)
    with make_llm(llama_dir, kv_cache_memory_bytes=KV, engine_process=True) as llm:
        for bad in (0, -1, True, 2.0, "2", 5000):
            with pytest.raises(ValueError, match="new_data_parallel_size"):
                llm.scale_data_parallel(bad)  # type: ignore[arg-type]
        llm.engine_core.scaling = True  # as if another scale were under way
        with pytest.raises(ScaleInProgressError):
            llm.scale_data_parallel(2)
        llm.engine_core.scaling = False
        assert llm.data_parallel_size == 1
        assert generate_ids(llm, random_prompts((5,)), greedy(4))


def _stream(url: str, prompt: list[int], out: list, index: int) -> None:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 40, "temperature": 0,
            "ignore_eos": True, "stream": True}
    text, finish = [], None
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=AUTH,
                          timeout=120) as r:
            if r.status_code != 200:
                out[index] = f"HTTP {r.status_code}: {r.read()!r}"
                return
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    out[index] = f"error event: {chunk}"
                    return
                choice = chunk["choices"][0]
                text.append(choice["text"])
                finish = choice["finish_reason"] or finish
    except httpx.HTTPError as e:
        out[index] = f"{type(e).__name__}: {e}"
        return
    out[index] = ("".join(text), finish)


def _load(url: str, prompts: list[list[int]]) -> tuple[list[threading.Thread], list]:
    out: list = [None] * len(prompts)
    threads = [threading.Thread(target=_stream, args=(url, p, out, i))
               for i, p in enumerate(prompts)]
    for t in threads:
        t.start()
    return threads, out


def test_server_scales_1_3_2_1_under_48_streams(llama_dir: Path, tmp_path: Path) -> None:
    prompts = random_prompts(tuple(4 + i % 20 for i in range(48)), seed=7)
    with serve(llama_dir, tmp_path / "server.log", "--enable-elastic-ep") as s:
        threads, fixed = _load(s.url, prompts)  # the fixed-size run
        for t in threads:
            t.join()
        assert all(isinstance(o, tuple) and o[1] == "length" for o in fixed), fixed
        assert httpx.get(f"{s.url}/is_scaling_elastic_ep", headers=AUTH).json() == {
            "is_scaling_elastic_ep": False}

        threads, scaled = _load(s.url, prompts)
        sizes = []
        for size in (3, 2, 1):
            time.sleep(0.3)
            r = httpx.post(f"{s.url}/scale_elastic_ep", headers=AUTH, timeout=120,
                           json={"new_data_parallel_size": size, "drain_timeout": 1})
            assert r.status_code == 200, r.text
            sizes.append(r.json()["new_data_parallel_size"])
            if size == 3:  # the new engines get work while the streams run
                metrics = httpx.get(f"{s.url}/metrics", headers=AUTH).text
                assert "fleetllm:data_parallel_size 3.0" in metrics
        for t in threads:
            t.join()
        assert sizes == [3, 2, 1]
        assert scaled == fixed  # zero failed requests, the same greedy text
        names = sorted(p.name() for p in psutil.Process(s.proc.pid).children(recursive=True)
                       if p.name().startswith("fleetllm-core"))
        assert names == ["fleetllm-core0"], names  # nothing left of the removed engines


def test_server_on_ray_scales_under_48_streams(llama_dir: Path, tmp_path: Path) -> None:
    """The same with engine cores as Ray actors (a local Ray the server starts): 1 -> 2 -> 1
    while 48 streams run, zero failures, the fixed-size run's texts."""
    pytest.importorskip("ray", reason="needs Ray: pip install -e .[ray]")
    prompts = random_prompts(tuple(4 + i % 20 for i in range(48)), seed=8)
    with serve(llama_dir, tmp_path / "server.log", "--enable-elastic-ep",
               "--data-parallel-backend", "ray") as s:
        threads, fixed = _load(s.url, prompts)
        for t in threads:
            t.join()
        threads, scaled = _load(s.url, prompts)
        for size in (2, 1):
            time.sleep(0.3)
            r = httpx.post(f"{s.url}/scale_elastic_ep", headers=AUTH, timeout=120,
                           json={"new_data_parallel_size": size, "drain_timeout": 1})
            assert r.status_code == 200, r.text
        for t in threads:
            t.join()
        assert all(isinstance(o, tuple) for o in fixed), fixed
        assert scaled == fixed


def test_concurrent_scales_get_409_and_bad_ones_400(llama_dir: Path, tmp_path: Path) -> None:
    with serve(llama_dir, tmp_path / "server.log", "--enable-elastic-ep") as s:
        codes: list[int] = []

        def scale(size: int) -> None:
            codes.append(httpx.post(f"{s.url}/scale_elastic_ep", headers=AUTH, timeout=120,
                                    json={"new_data_parallel_size": size}).status_code)

        first = threading.Thread(target=scale, args=(2,))
        first.start()
        deadline = time.monotonic() + 30
        while not httpx.get(f"{s.url}/is_scaling_elastic_ep",
                            headers=AUTH).json()["is_scaling_elastic_ep"]:
            assert time.monotonic() < deadline and first.is_alive()
            time.sleep(0.01)
        scale(3)
        first.join()
        assert sorted(codes) == [200, 409], codes
        for bad in ({"new_data_parallel_size": 0}, {"new_data_parallel_size": "2"},
                    {"new_data_parallel_size": 2, "drain_timeout": -1}, {},
                    {"new_data_parallel_size": 2, "wizard": 1}):
            r = httpx.post(f"{s.url}/scale_elastic_ep", headers=AUTH, json=bad)
            assert r.status_code == 400, (bad, r.text)
            assert r.json()["error"]["message"]
        r = httpx.post(f"{s.url}/v1/completions", headers=AUTH, timeout=60,
                       json={"model": MODEL, "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200


def test_elastic_routes_need_the_flag(llama_dir: Path, tmp_path: Path) -> None:
    with serve(llama_dir, tmp_path / "server.log") as s:
        r = httpx.post(f"{s.url}/scale_elastic_ep", headers=AUTH,
                       json={"new_data_parallel_size": 2})
        assert r.status_code == 404
