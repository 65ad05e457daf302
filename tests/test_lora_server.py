"""LoRA through the front ends: LLM.generate(lora_request=...) in-process and with engine
processes, and `fleetllm serve --enable-lora` with the official openai client (adapters by
model name, /v1/models, runtime load and unload, bad adapters, metrics, and data parallel
with two API servers)."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from fleetllm import LLM, LoRARequest, SamplingParams
from fleetllm.errors import LoRAAdapterError
from tests.helpers import random_prompts
from tests.lora_helpers import ALL_SEVEN, ATTENTION, make_adapter, peft_greedy
from tests.test_openai_server import API_KEY, AUTH, KV, MAX_LEN, MODEL, serve

pytest.importorskip("peft", reason="the LoRA tests need peft: pip install -e .[test]")

PROMPTS = random_prompts((5, 9, 17, 30), seed=5)
PROMPTS_TEXT = ["The quick brown fox", "def fibonacci(n):", "class Point:", "SELECT * FROM"]
MAX_TOKENS = 12
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def adapters(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora_server")
    return {"sql-lora": make_adapter(llama_dir, root / "sql", 8, 16, ALL_SEVEN, seed=11),
            "chat-lora": make_adapter(llama_dir, root / "chat", 4, 8, ATTENTION, seed=12)}


@pytest.fixture(scope="module")
def expected(llama_dir: Path, adapters: dict[str, Path]) -> dict[str | None, list[list[int]]]:
    """transformers + peft greedy ids per adapter (None: the base model)."""
    want: dict[str | None, list[list[int]]] = {None: peft_greedy(llama_dir, None, PROMPTS,
                                                                 MAX_TOKENS)}
    for name, path in adapters.items():
        want[name] = peft_greedy(llama_dir, LoRARequest(name, 1, str(path)), PROMPTS,
                                 MAX_TOKENS)
    assert want["sql-lora"] != want[None] and want["chat-lora"] != want[None]
    return want


@pytest.fixture(scope="module")
def texts(llama_dir: Path, adapters: dict[str, Path]) -> dict[str | None, list[str]]:
    """The offline LLM's greedy texts per adapter (its ids equal peft's: the test below)."""
    loras = {name: LoRARequest(name, i + 1, str(path))
             for i, (name, path) in enumerate(adapters.items())}
    out: dict[str | None, list[str]] = {}
    with LLM(str(llama_dir), kv_cache_memory_bytes=KV, enable_lora=True,
             max_model_len=MAX_LEN) as llm:
        for name in (None, *loras):
            res = llm.generate(PROMPTS_TEXT, GREEDY, use_tqdm=False,
                               lora_request=loras.get(name))  # type: ignore[arg-type]
            out[name] = [o.outputs[0].text for o in res]
    assert out["sql-lora"] != out[None]
    return out


@pytest.mark.parametrize("engine_process", [False, True], ids=["in-process", "engine-process"])
def test_llm_generate_takes_one_adapter_or_one_per_prompt(
        llama_dir: Path, adapters: dict[str, Path], expected: dict, engine_process: bool
        ) -> None:
    sql = LoRARequest("sql-lora", 1, str(adapters["sql-lora"]))
    chat = LoRARequest("chat-lora", 2, str(adapters["chat-lora"]))
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    with LLM(str(llama_dir), kv_cache_memory_bytes=KV, enable_lora=True, max_loras=2,
             engine_process=engine_process) as llm:
        out = llm.generate(prompts, GREEDY, use_tqdm=False, lora_request=sql)
        assert [o.outputs[0].token_ids for o in out] == expected["sql-lora"]
        per = [sql, chat, None, chat]
        out = llm.generate(prompts, GREEDY, use_tqdm=False, lora_request=per)
        names = ["sql-lora", "chat-lora", None, "chat-lora"]
        assert [o.outputs[0].token_ids for o in out] == [
            expected[n][i] for i, n in enumerate(names)]
        assert llm.list_loras() == {1, 2}
        assert [lr.lora_name for lr in llm.get_lora_requests()] == ["sql-lora", "chat-lora"]
        with pytest.raises(ValueError, match="one .or None. per prompt"):
            llm.generate(prompts, GREEDY, lora_request=[sql])
        with pytest.raises(TypeError, match="LoRARequest"):
            llm.generate(prompts, GREEDY, lora_request="sql-lora")  # type: ignore[arg-type]
        # a bad adapter in the last prompt: its own error type, nothing queued, and the
        # engine goes on
        broken = LoRARequest("broken", 3, str(llama_dir / "no-such-adapter"))
        with pytest.raises(LoRAAdapterError, match="no-such-adapter"):
            llm.generate(prompts, GREEDY, use_tqdm=False, lora_request=[sql, sql, sql, broken])
        assert not llm.engine_core.has_unfinished_requests()
        out = llm.generate(prompts, GREEDY, use_tqdm=False, lora_request=sql)
        assert [o.outputs[0].token_ids for o in out] == expected["sql-lora"]
    with LLM(str(llama_dir), kv_cache_memory_bytes=KV) as llm:
        with pytest.raises(ValueError, match="enable_lora=True"):
            llm.generate(prompts, GREEDY, lora_request=sql)


def _text(client: openai.OpenAI, model: str, k: int) -> str:
    r = client.completions.create(model=model, prompt=PROMPTS_TEXT[k], max_tokens=MAX_TOKENS,
                                  temperature=0, extra_body={"ignore_eos": True})
    return r.choices[0].text


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def test_server_adapters_by_model_name_with_runtime_load_and_unload(
        llama_dir: Path, adapters: dict[str, Path], texts: dict, tmp_path: Path) -> None:
    with serve(llama_dir, tmp_path / "server.log", "--enable-lora", "--max-loras", "2",
               "--lora-modules", f"sql-lora={adapters['sql-lora']}",
               "--allow-runtime-lora-updating") as s:
        client = _client(s.url)
        assert _text(client, "sql-lora", 0) == texts["sql-lora"][0]
        assert _text(client, MODEL, 0) == texts[None][0]
        cards = {m.id: m for m in client.models.list().data}
        assert set(cards) == {MODEL, "sql-lora"}
        assert cards["sql-lora"].parent == MODEL  # type: ignore[attr-defined]

        load = {"lora_name": "chat-lora", "lora_path": str(adapters["chat-lora"])}
        r = httpx.post(f"{s.url}/v1/load_lora_adapter", json=load, headers=AUTH, timeout=60)
        assert r.status_code == 200, r.text
        assert _text(client, "chat-lora", 1) == texts["chat-lora"][1]
        again = httpx.post(f"{s.url}/v1/load_lora_adapter", json=load, headers=AUTH)
        assert again.status_code == 400 and "already loaded" in again.text
        bad = httpx.post(f"{s.url}/v1/load_lora_adapter", headers=AUTH, timeout=60,
                         json={"lora_name": "nope", "lora_path": str(tmp_path / "missing")})
        assert bad.status_code == 400 and "missing" in bad.json()["error"]["message"], bad.text
        metrics = httpx.get(f"{s.url}/metrics", headers=AUTH).text
        assert 'fleetllm:lora_requests_info{max_lora="2"' in metrics

        # unloaded while a long stream runs with it: the stream finishes in full
        stream = client.completions.create(model="chat-lora", prompt=PROMPTS_TEXT[0],
                                           max_tokens=150, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        first = next(iter(stream))
        r = httpx.post(f"{s.url}/v1/unload_lora_adapter", json={"lora_name": "chat-lora"},
                       headers=AUTH)
        assert r.status_code == 200, r.text
        chunks = [first, *stream]
        assert chunks[-1].choices[0].finish_reason == "length"
        with pytest.raises(openai.NotFoundError):
            _text(client, "chat-lora", 1)
        r = httpx.post(f"{s.url}/v1/unload_lora_adapter", json={"lora_name": "chat-lora"},
                       headers=AUTH)
        assert r.status_code == 404
        assert _text(client, "sql-lora", 2) == texts["sql-lora"][2]  # still serving


def test_runtime_updates_need_the_flag_and_bad_modules_stop_the_start(
        llama_dir: Path, adapters: dict[str, Path], tmp_path: Path) -> None:
    with serve(llama_dir, tmp_path / "server.log", "--enable-lora") as s:
        r = httpx.post(f"{s.url}/v1/load_lora_adapter", headers=AUTH, json={
            "lora_name": "x", "lora_path": str(adapters["sql-lora"])})
        assert r.status_code == 404
    with pytest.raises(AssertionError, match="exited early"):
        with serve(llama_dir, tmp_path / "bad.log", "--enable-lora", "--lora-modules",
                   f"broken={tmp_path / 'missing'}"):
            pass
    assert "broken" in (tmp_path / "bad.log").read_text()


def test_a_runtime_load_reaches_both_engines_and_both_api_servers(
        llama_dir: Path, adapters: dict[str, Path], texts: dict, tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    with serve(llama_dir, log, "--enable-lora", "--allow-runtime-lora-updating",
               "--data-parallel-size", "2", "--api-server-count", "2") as s:
        r = httpx.post(f"{s.url}/v1/load_lora_adapter", headers=AUTH, timeout=60, json={
            "lora_name": "sql-lora", "lora_path": str(adapters["sql-lora"])})
        assert r.status_code == 200, r.text

        def one(k: int) -> str:  # a fresh connection each, so both servers take some
            client = _client(s.url)
            try:
                return _text(client, "sql-lora", k % len(PROMPTS_TEXT))
            finally:
                client.close()

        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(one, range(16)))
        assert got == [texts["sql-lora"][k % len(PROMPTS_TEXT)] for k in range(16)]
        # Every API server lists it (fresh connections until both have answered).
        pattern = re.compile(r"api_server(\d) uvicorn.access: .*GET /v1/models")
        for _ in range(25):
            with ThreadPoolExecutor(8) as pool:
                lists = list(pool.map(lambda _: httpx.get(
                    f"{s.url}/v1/models", headers=AUTH, timeout=10).json(), range(8)))
            assert all("sql-lora" in {m["id"] for m in ms["data"]} for ms in lists)
            if set(pattern.findall(log.read_text())) == {"0", "1"}:
                break
        assert set(pattern.findall(log.read_text())) == {"0", "1"}
        # and both engines served it
        stats = httpx.get(f"{s.url}/metrics", headers=AUTH).text
        assert re.search(r'fleetllm:prefix_cache_queries_total\{engine="1"\} [1-9]', stats)
