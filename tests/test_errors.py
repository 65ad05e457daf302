"""Invalid input is refused with a clear error, and the engine keeps working afterwards."""

from __future__ import annotations

import math

import pytest
from safetensors.torch import load_file, save_file

from fleetllm import LLM, SamplingParams
from fleetllm.errors import ConfigurationError, ModelLoadError
from tests.helpers import copy_checkpoint, edit_json, generate_ids, greedy, make_llm, random_prompts

# ---- SamplingParams ----------------------------------------------------------------------


@pytest.mark.parametrize("field, kwargs", [
    ("max_tokens", {"max_tokens": 0}),
    ("max_tokens", {"max_tokens": -1}),
    ("temperature", {"temperature": math.nan}),
    ("temperature", {"temperature": -1.0}),
    ("top_p", {"top_p": 0.0}),
    ("top_p", {"top_p": 2.0}),
    ("n", {"n": 0}),
    ("min_tokens", {"min_tokens": 5, "max_tokens": 3}),
    ("top_k", {"top_k": -2}),
    ("min_p", {"min_p": 2.0}),
    ("repetition_penalty", {"repetition_penalty": 0.0}),
    ("logprobs", {"logprobs": -1}),
    ("prompt_logprobs", {"prompt_logprobs": -1}),
    ("presence_penalty", {"presence_penalty": 3.0}),
    ("frequency_penalty", {"frequency_penalty": -2.5}),
])
def test_invalid_sampling_params(field, kwargs):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_valid_sampling_params_edges():
    # The boundaries themselves are valid.
    SamplingParams(max_tokens=3, temperature=0.0, top_p=1.0, n=1, min_tokens=3, top_k=-1,
                   min_p=1.0, logprobs=0, prompt_logprobs=0)
    assert SamplingParams(top_k=-1).top_k == 0  # -1 means "off", as in vLLM
    assert SamplingParams(stop="x").stop == ["x"]


@pytest.mark.parametrize("field", ["stop", "stop_token_ids"])
def test_none_for_stop_fields(field):
    """vLLM's SamplingParams take None for "no stop strings / ids"; fleetllm must either
    accept it or refuse it with a ValueError naming the field (not a bare TypeError)."""
    try:
        params = SamplingParams(**{field: None})
    except ValueError as e:
        assert field in str(e)
    else:
        assert not getattr(params, field)


# ---- prompts -----------------------------------------------------------------------------

GOOD = random_prompts((7,), seed=20)[0]


@pytest.fixture(scope="module")
def small_llm(llama_dir):
    engine = make_llm(llama_dir, max_model_len=32)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def baseline(small_llm):
    return generate_ids(small_llm, [GOOD], greedy(8))[0]


def _still_works(engine, baseline):
    assert generate_ids(engine, [GOOD], greedy(8))[0] == baseline
    stats = engine.get_stats()
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0
    assert stats["kv_cache_usage"] == 0.0


def test_prompt_longer_than_max_model_len(small_llm, baseline):
    for n in (32, 40):
        with pytest.raises(ValueError, match="max_model_len"):
            small_llm.generate({"prompt_token_ids": list(range(1, n + 1))}, greedy(4),
                               use_tqdm=False)
        _still_works(small_llm, baseline)
    # A text prompt that tokenizes past the limit.
    with pytest.raises(ValueError, match="max_model_len"):
        small_llm.generate("def fibonacci(n): " * 10, greedy(4), use_tqdm=False)
    _still_works(small_llm, baseline)


def test_prompt_just_fitting_max_model_len(small_llm):
    # 31 tokens leave room for exactly one generated token.
    out = small_llm.generate({"prompt_token_ids": list(range(1, 32))}, greedy(8),
                             use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 1
    assert out.outputs[0].finish_reason == "length"


@pytest.mark.parametrize("prompt", ["", {"prompt_token_ids": []}, {"prompt": ""}])
def test_empty_prompt(small_llm, baseline, prompt):
    with pytest.raises(ValueError, match="empty"):
        small_llm.generate(prompt, greedy(4), use_tqdm=False)
    _still_works(small_llm, baseline)


@pytest.mark.parametrize("ids", [[300], [5, 1000], [-1, 5], [5, 2**40]])
def test_token_ids_out_of_vocab(small_llm, baseline, ids):
    with pytest.raises(ValueError, match="300"):
        small_llm.generate({"prompt_token_ids": ids}, greedy(4), use_tqdm=False)
    _still_works(small_llm, baseline)


def test_bad_prompt_in_batch_adds_nothing(small_llm, baseline):
    with pytest.raises(ValueError):
        small_llm.generate([{"prompt_token_ids": GOOD}, {"prompt_token_ids": [999]}],
                           greedy(4), use_tqdm=False)
    _still_works(small_llm, baseline)
    with pytest.raises(ValueError, match="sampling_params"):
        small_llm.generate([{"prompt_token_ids": GOOD}] * 2, [greedy(4)] * 3, use_tqdm=False)
    _still_works(small_llm, baseline)
    with pytest.raises(TypeError):
        small_llm.generate([{"prompt_token_ids": GOOD}], [{"max_tokens": 4}], use_tqdm=False)
    _still_works(small_llm, baseline)
    with pytest.raises(TypeError):
        small_llm.generate([{"text": "hi"}], greedy(4), use_tqdm=False)
    _still_works(small_llm, baseline)


@pytest.mark.parametrize("field", ["logprobs", "prompt_logprobs"])
def test_too_many_logprobs(small_llm, baseline, field):
    """More logprobs than the vocabulary has (300): a ValueError naming the field at
    generate() (vLLM refuses more than its max_logprobs the same way), nothing added."""
    params = greedy(4, **{field: 301})
    with pytest.raises(ValueError, match=field):
        small_llm.generate([{"prompt_token_ids": GOOD}] * 2, params, use_tqdm=False)
    _still_works(small_llm, baseline)


def test_max_tokens_none_runs_to_max_model_len(small_llm):
    out = small_llm.generate({"prompt_token_ids": GOOD}, greedy(None), use_tqdm=False)[0]
    assert len(GOOD) + len(out.outputs[0].token_ids) == 32
    assert out.outputs[0].finish_reason == "length"


def test_engine_recovers_from_a_failed_step(small_llm, baseline):
    executor = small_llm.engine_core.executor
    original = executor.execute_model
    calls = 0

    def failing(scheduler_output):
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("injected failure")
        return original(scheduler_output)

    executor.execute_model = failing
    try:
        with pytest.raises(RuntimeError, match="injected failure"):
            small_llm.generate([{"prompt_token_ids": GOOD}] * 3, greedy(8), use_tqdm=False)
    finally:
        executor.execute_model = original
    assert not small_llm.output_processor.has_unfinished()
    _still_works(small_llm, baseline)


# ---- engine arguments --------------------------------------------------------------------

def test_unknown_llm_kwarg(llama_dir):
    with pytest.raises(TypeError, match="gpu_memory_utilisation"):
        LLM(str(llama_dir), gpu_memory_utilisation=0.5)


@pytest.mark.parametrize("kwargs, names", [
    ({"dtype": "float8"}, ["float8", "float32", "bfloat16", "float16", "auto"]),
    ({"load_format": "pickle"}, ["pickle", "safetensors", "dummy", "auto"]),
])
def test_bad_dtype_or_load_format(llama_dir, kwargs, names):
    with pytest.raises(ConfigurationError) as info:
        LLM(str(llama_dir), **kwargs)
    msg = str(info.value)
    assert msg.startswith("[E005]")
    for name in names:
        assert name in msg


def test_kv_cache_too_small(llama_dir):
    with pytest.raises(ConfigurationError, match="kv_cache_memory_bytes"):
        LLM(str(llama_dir), max_model_len=160, kv_cache_memory_bytes=4 * 8192)


def test_max_model_len_beyond_position_embeddings(llama_dir):
    with pytest.raises(ConfigurationError, match="max_position_embeddings"):
        LLM(str(llama_dir), max_model_len=1024)


# ---- checkpoint errors -------------------------------------------------------------------

def _broken(llama_dir, tmp_path, breaker):
    path = copy_checkpoint(llama_dir, tmp_path / "ckpt")
    breaker(path)
    return path


def _load_error(path, *needles):
    with pytest.raises(ModelLoadError) as info:
        LLM(str(path))
    msg = str(info.value)
    assert msg.startswith("[E004]"), msg
    for needle in needles:
        assert needle in msg, msg
    return msg


def test_missing_directory(tmp_path):
    _load_error(tmp_path / "nope", "nope")


def test_missing_config(llama_dir, tmp_path):
    path = _broken(llama_dir, tmp_path, lambda p: (p / "config.json").unlink())
    _load_error(path, "config.json")


def test_missing_weights(llama_dir, tmp_path):
    path = _broken(llama_dir, tmp_path, lambda p: (p / "model.safetensors").unlink())
    _load_error(path, "model.safetensors")


def test_missing_tokenizer(llama_dir, tmp_path):
    path = _broken(llama_dir, tmp_path, lambda p: (p / "tokenizer.json").unlink())
    _load_error(path, "tokenizer.json")
    # Without a tokenizer the engine still runs on token ids.
    with make_llm(path, skip_tokenizer_init=True) as engine:
        out = engine.generate({"prompt_token_ids": GOOD}, greedy(4), use_tqdm=False)[0]
        assert len(out.outputs[0].token_ids) == 4
        with pytest.raises(ValueError, match="skip_tokenizer_init"):
            engine.generate("hello", greedy(4), use_tqdm=False)


def test_unsupported_architecture(llama_dir, tmp_path):
    def gpt2(p):
        edit_json(p / "config.json", lambda d: d.update(architectures=["GPT2LMHeadModel"]))

    path = _broken(llama_dir, tmp_path, gpt2)
    _load_error(path, "GPT2LMHeadModel", "LlamaForCausalLM", "config.json")


def test_shape_mismatch(llama_dir, tmp_path):
    def smaller_mlp(p):
        edit_json(p / "config.json", lambda d: d.update(intermediate_size=96))

    path = _broken(llama_dir, tmp_path, smaller_mlp)
    msg = _load_error(path, "mlp.")
    assert any(name in msg for name in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))
    assert "128" in msg and "96" in msg


@pytest.mark.parametrize("tensor", [
    "model.layers.1.mlp.down_proj.weight",
    "model.layers.0.self_attn.k_proj.weight",
    "model.norm.weight",
    "lm_head.weight",
])
def test_missing_tensor(llama_dir, tmp_path, tensor):
    def drop(p):
        weights = load_file(p / "model.safetensors")
        assert tensor in weights
        del weights[tensor]
        save_file(weights, p / "model.safetensors", metadata={"format": "pt"})

    path = _broken(llama_dir, tmp_path, drop)
    _load_error(path, tensor)


def test_truncated_weights(llama_dir, tmp_path):
    def truncate(p):
        data = (p / "model.safetensors").read_bytes()
        (p / "model.safetensors").write_bytes(data[: len(data) // 2])

    path = _broken(llama_dir, tmp_path, truncate)
    _load_error(path, "model.safetensors")


def test_default_kv_cache_fits_the_model_and_says_why(llama_dir, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="fleetllm.engine.core"):
        llm = LLM(str(llama_dir), max_num_seqs=4, max_model_len=64)
    try:
        # 4 sequences x 4 blocks, plus 25% for the prefix cache, plus the null block
        assert len(llm.engine_core.scheduler.kv.pool.blocks) == 21
        assert "sized by what 4 sequences (max_num_seqs) of 64 tokens" in caplog.text
    finally:
        llm.shutdown()
    explicit = LLM(str(llama_dir), max_num_seqs=4, max_model_len=64,
                   kv_cache_memory_bytes=1 << 22)
    try:
        assert len(explicit.engine_core.scheduler.kv.pool.blocks) > 21
    finally:
        explicit.shutdown()


@pytest.mark.parametrize("kwargs,name", [
    ({"max_worker_restarts": -1}, "max_worker_restarts"),
    ({"max_worker_restarts": "3"}, "max_worker_restarts"),
    ({"execute_model_timeout_s": 0}, "execute_model_timeout_s"),
    ({"execute_model_timeout_s": float("inf")}, "execute_model_timeout_s"),
    ({"worker_extension_cls": "nodots"}, "worker_extension_cls"),
    ({"ray_placement": "scatter"}, "ray_placement")])
def test_bad_recovery_and_placement_args_name_the_field(llama_dir, kwargs, name):
    from fleetllm.config import EngineArgs

    with pytest.raises(ConfigurationError, match=rf"\[E005\] {name}="):
        EngineArgs(model=str(llama_dir), **kwargs).create_engine_config()
