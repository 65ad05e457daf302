"""KV connectors end to end: SharedStorageConnector between two engines (uni, mp tp=2,
ray tp=2), and disaggregated serving (prefill server, decode server, proxy)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest

from tests.helpers import (
    BLOCK_SIZE,
    LENGTHS,
    free_ports,
    greedy,
    make_llm,
    random_prompts,
    token_prompts,
)
from tests.test_openai_server import API_KEY, ENV, MODEL, serve

KV_BYTES = 1 << 22
LAYOUTS = {"uni": {}, "mp_tp2": {"tensor_parallel_size": 2, "distributed_executor_backend": "mp"},
           "ray_tp2": {"tensor_parallel_size": 2, "distributed_executor_backend": "ray"}}


def _storage(path: Path, role: str) -> dict:
    return {"kv_connector": "SharedStorageConnector", "kv_role": role,
            "kv_connector_extra_config": {"shared_storage_path": str(path)}}


def _run(llm, prompts: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    outs = llm.generate(token_prompts(prompts), greedy(8), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], [o.num_cached_tokens for o in outs]


def _all_blocks_free(llm) -> None:
    deadline = time.monotonic() + 10
    while llm.stats()["kv_cache_usage"] != 0.0:
        assert time.monotonic() < deadline, f"blocks still held: {llm.stats()}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def plain(llama_dir: Path) -> list[list[int]]:
    llm = make_llm(llama_dir, kv_cache_memory_bytes=KV_BYTES)
    try:
        return _run(llm, random_prompts(LENGTHS))[0]
    finally:
        llm.shutdown()


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_shared_storage_producer_then_fresh_consumer(llama_dir: Path, tmp_path: Path,
                                                     plain: list[list[int]],
                                                     layout: str) -> None:
    if layout == "ray_tp2":
        pytest.importorskip("ray")
    prompts = random_prompts(LENGTHS)
    kw = dict(kv_cache_memory_bytes=KV_BYTES, **LAYOUTS[layout])
    producer = make_llm(llama_dir, kv_transfer_config=_storage(tmp_path, "kv_producer"), **kw)
    try:
        assert _run(producer, prompts)[0] == plain
        _all_blocks_free(producer)
    finally:
        producer.shutdown()
    # A corrupt entry: the 6th prompt's first layer on the last rank.
    victim = sorted(tmp_path.glob("*/rank*/layer0.safetensors"))[-1]
    victim.write_bytes(victim.read_bytes()[:-16] + b"\0" * 16)
    consumer = make_llm(llama_dir, kv_transfer_config=_storage(tmp_path, "kv_consumer"),
                        engine_process=True, **kw)
    try:
        ids, cached = _run(consumer, prompts)
        assert ids == plain
        stats = consumer.stats()
        _all_blocks_free(consumer)
    finally:
        consumer.shutdown()
    aligned = [(n - 1) // BLOCK_SIZE * BLOCK_SIZE for n in LENGTHS]
    loaded = [c == a for c, a in zip(cached, aligned)]
    assert sum(not ok for ok in loaded) == 1  # only the corrupt one was recomputed
    for n, c, ok in zip(LENGTHS, cached, loaded):
        assert not ok or n - c <= BLOCK_SIZE  # no more than the last partial block
    assert stats["kv_connector_loads_failed"] == 1
    assert stats["kv_connector_tokens_loaded"] == sum(a for a, ok in zip(aligned, loaded) if ok)


# ---- disaggregated serving ----------------------------------------------------------------
PROMPTS = [f"{w} " * (6 + i) for i, w in enumerate(
    ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta"] * 2)]


def _p2p(role: str, port: int) -> str:
    key = "remote_port" if role == "kv_producer" else "kv_port"
    return json.dumps({"kv_connector": "P2PZmqConnector", "kv_role": role,
                       "kv_connector_extra_config": {key: port, "recv_timeout_s": 20}})


@contextmanager
def proxy(prefill: str, decode: str, log: Path) -> Iterator[str]:
    port = free_ports(1)
    cmd = [sys.executable, "-m", "fleetllm.entrypoints.cli", "proxy", "--prefill", prefill,
           "--decode", decode, "--port", str(port)]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=ENV)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            try:
                httpx.get(f"{url}/v1/models", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def _stream_all(url: str) -> list[str]:
    def one(prompt: str) -> str:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0,
                               timeout=120)
        try:
            stream = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8,
                                               temperature=0, stream=True,
                                               extra_body={"ignore_eos": True})
            return "".join(c.choices[0].text for c in stream if c.choices)
        finally:
            client.close()

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        return list(pool.map(one, PROMPTS))


def _metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith(f"{name}_created"))


def _wait_blocks_free(url: str) -> None:
    deadline = time.monotonic() + 10
    while _metric(url, "fleetllm:kv_cache_usage_perc") != 0.0:
        assert time.monotonic() < deadline, f"{url} still holds KV blocks"
        time.sleep(0.1)


def test_disaggregated_serving_matches_one_server(llama_dir: Path, tmp_path: Path) -> None:
    with serve(llama_dir, tmp_path / "plain.log") as plain:
        want = _stream_all(plain.url)
    kv_port = free_ports(1)
    with serve(llama_dir, tmp_path / "decode.log", "--kv-transfer-config",
               _p2p("kv_consumer", kv_port)) as decode, \
         serve(llama_dir, tmp_path / "prefill.log", "--kv-transfer-config",
               _p2p("kv_producer", kv_port)) as prefill, \
         proxy(prefill.url, decode.url, tmp_path / "proxy.log") as url:
        assert _stream_all(url) == want
        assert _metric(decode.url, "fleetllm:kv_connector_tokens_loaded") > 0
        # The decode side computed at most each prompt's last partial block itself.
        computed = (_metric(decode.url, "fleetllm:prefix_cache_queries")
                    - _metric(decode.url, "fleetllm:prefix_cache_hits"))
        assert computed <= BLOCK_SIZE * len(PROMPTS)
        _wait_blocks_free(prefill.url)
        _wait_blocks_free(decode.url)
        prefill.proc.terminate()
        prefill.proc.wait(30)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0)
        with pytest.raises(openai.APIStatusError) as e:
            client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=4)
        assert e.value.status_code == 503 and "prefill server" in str(e.value)
        _wait_blocks_free(decode.url)


@pytest.mark.parametrize("layout", ["mp_tp2", "ray_tp2"])
def test_p2p_between_offline_engines_under_tensor_parallel(llama_dir: Path,
                                                           plain: list[list[int]],
                                                           layout: str) -> None:
    """P2PZmqConnector without the proxy: the producer prefills each prompt (max_tokens=1)
    and pushes its KV rank to rank; the consumer, told the same transfer ids, loads it and
    computes at most the last partial block, with the plain engine's greedy tokens."""
    if layout == "ray_tp2":
        pytest.importorskip("ray")
    from fleetllm import SamplingParams

    prompts = random_prompts(LENGTHS)
    port = free_ports(2)  # rank r listens on port + r
    kw = dict(kv_cache_memory_bytes=KV_BYTES, **LAYOUTS[layout])
    consumer = make_llm(llama_dir, kv_transfer_config=json.loads(_p2p("kv_consumer", port)),
                        **kw)
    producer = None
    try:
        producer = make_llm(llama_dir, kv_transfer_config=json.loads(_p2p("kv_producer", port)),
                            **kw)

        def params(k: int, role: str, max_tokens: int) -> SamplingParams:
            flag = "do_remote_decode" if role == "prefill" else "do_remote_prefill"
            return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True,
                                  extra_args={"kv_transfer_params": {
                                      flag: True, "transfer_id": f"t{k}"}})

        producer.generate(token_prompts(prompts),
                          [params(k, "prefill", 1) for k in range(len(prompts))],
                          use_tqdm=False)
        _all_blocks_free(producer)
        outs = consumer.generate(token_prompts(prompts),
                                 [params(k, "decode", 8) for k in range(len(prompts))],
                                 use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == plain
        aligned = [(n - 1) // BLOCK_SIZE * BLOCK_SIZE for n in LENGTHS]
        assert [o.num_cached_tokens for o in outs] == aligned
        _all_blocks_free(consumer)
    finally:
        if producer is not None:
            producer.shutdown()
        consumer.shutdown()
