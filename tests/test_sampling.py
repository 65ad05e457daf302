"""Sampling behaviour: seeds, top-k/top-p/min-p, stop conditions, logprobs, n, penalties."""

from __future__ import annotations

import pytest
import torch

from fleetllm import SamplingParams
from tests.helpers import (
    copy_checkpoint,
    edit_json,
    generate_ids,
    greedy,
    hf_logprobs,
    hf_model,
    kv_block_bytes,
    make_llm,
    random_prompts,
    token_prompts,
)

PROMPTS = random_prompts((5, 12, 23, 40), seed=10)


@pytest.fixture(scope="module")
def llm(llama_dir):
    engine = make_llm(llama_dir)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def greedy_ids(llm):
    return generate_ids(llm, PROMPTS, greedy(24))


def sample(temperature=1.0, max_tokens=16, **kw) -> SamplingParams:
    return SamplingParams(temperature=temperature, max_tokens=max_tokens, ignore_eos=True, **kw)


def first_new_index(ids: list[int], start: int = 2) -> int:
    """The first position >= start whose token did not occur before it."""
    return next(j for j in range(start, len(ids)) if ids[j] not in ids[:j])


# ---- seeds and batch composition ----------------------------------------------------------

def test_seed_independent_of_batch(llm):
    seeded = sample(seed=1234)
    alone = generate_ids(llm, [PROMPTS[1]], seeded)[0]
    again = generate_ids(llm, [PROMPTS[1]], seeded)[0]
    assert alone == again
    batch = [PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[3], PROMPTS[1]]
    params = [sample(), seeded, sample(seed=7), sample(), sample(seed=1234, max_tokens=8)]
    mixed = generate_ids(llm, batch, params)
    assert mixed[1] == alone
    assert mixed[4] == alone[:8]
    # Reordered, with a greedy neighbour this time.
    mixed2 = generate_ids(llm, [PROMPTS[3], PROMPTS[1]], [greedy(16), seeded])
    assert mixed2[1] == alone
    # The seed must matter: another seed, or no seed, gives another text.
    assert generate_ids(llm, [PROMPTS[1]], sample(seed=1235))[0] != alone


def test_seed_survives_preemption(llm, llama_dir):
    prompts = random_prompts((30, 64, 77, 100, 41, 90), seed=11)
    params = [sample(max_tokens=32, seed=100 + i) for i in range(len(prompts))]
    want = generate_ids(llm, prompts, params)
    with make_llm(llama_dir, max_model_len=160,
                  kv_cache_memory_bytes=12 * kv_block_bytes()) as small:
        got = generate_ids(small, prompts, params)
        assert small.get_stats()["num_preemptions"] > 0
    assert got == want


# ---- truncation of the distribution -------------------------------------------------------

def test_temperature_one_differs_from_greedy(llm, greedy_ids):
    got = generate_ids(llm, PROMPTS, sample(max_tokens=24))
    assert got != greedy_ids


@pytest.mark.parametrize("kw", [{"top_k": 1}, {"top_p": 1e-6}, {"min_p": 1.0},
                                {"top_k": 1, "top_p": 0.9, "min_p": 0.1}])
def test_truncation_to_one_token_equals_greedy(llm, greedy_ids, kw):
    got = generate_ids(llm, PROMPTS, sample(max_tokens=24, **kw))
    assert got == greedy_ids


def test_top_k_restricts_to_top_tokens(llm, llama_dir):
    params = SamplingParams(temperature=1.0, top_k=3, max_tokens=12, ignore_eos=True,
                            logprobs=0)
    outs = llm.generate(token_prompts(PROMPTS), params, use_tqdm=False)
    for o in outs:
        ranks = [step[t].rank for t, step in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)]
        assert all(1 <= r <= 3 for r in ranks), ranks
        assert max(ranks) > 1  # it did sample, not just take the argmax


# ---- stop strings, stop tokens, eos, min/max tokens ---------------------------------------

def _pick_stop_string(text: str) -> tuple[str, int]:
    for start in range(2, len(text) - 3):
        s = text[start:start + 3]
        if all(c.isascii() and c.isprintable() for c in s) and text.find(s) == start:
            return s, start
    raise AssertionError(f"no usable stop string in {text!r}")


@pytest.mark.parametrize("prompt", ["def fibonacci(n):", "The quick brown fox"])
def test_stop_string(llm, prompt):
    full = llm.generate(prompt, greedy(24), use_tqdm=False)[0].outputs[0]
    stop, idx = _pick_stop_string(full.text)
    assert idx + len(stop) < len(full.text)  # the stop string ends before the full text
    out = llm.generate(prompt, greedy(24, stop=[stop, "never-occurs"]), use_tqdm=False)[0]
    comp = out.outputs[0]
    assert comp.text == full.text[:idx]
    assert comp.finish_reason == "stop" and comp.stop_reason == stop
    assert len(comp.token_ids) < len(full.token_ids)
    assert comp.token_ids == full.token_ids[:len(comp.token_ids)]
    kept = llm.generate(prompt, greedy(24, stop=stop, include_stop_str_in_output=True),
                        use_tqdm=False)[0].outputs[0]
    assert kept.text == full.text[:idx + len(stop)]
    assert kept.finish_reason == "stop" and kept.stop_reason == stop
    # The engine is still usable, and the aborted request left nothing behind.
    assert llm.get_stats()["num_running"] == 0 and llm.get_stats()["num_waiting"] == 0
    assert llm.generate(prompt, greedy(24), use_tqdm=False)[0].outputs[0].text == full.text


def test_stop_token_ids(llm, greedy_ids):
    ids = greedy_ids[2]
    j = first_new_index(ids)
    stop_tok = ids[j]
    comp = llm.generate(token_prompts([PROMPTS[2]]), greedy(24, stop_token_ids=[stop_tok]),
                        use_tqdm=False)[0].outputs[0]
    assert comp.token_ids == ids[:j + 1]
    assert comp.finish_reason == "stop" and comp.stop_reason == stop_tok
    # min_tokens: the stop token is masked until min_tokens tokens exist.
    m = j + 3
    comp = llm.generate(token_prompts([PROMPTS[2]]),
                        greedy(24, stop_token_ids=[stop_tok], min_tokens=m),
                        use_tqdm=False)[0].outputs[0]
    assert len(comp.token_ids) >= m
    assert comp.token_ids[:j] == ids[:j]
    assert stop_tok not in comp.token_ids[:m]


def test_max_tokens(llm, greedy_ids):
    for m in (1, 5, 24):
        outs = llm.generate(token_prompts(PROMPTS), greedy(m), use_tqdm=False)
        for o, g in zip(outs, greedy_ids):
            assert o.outputs[0].token_ids == g[:m]
            assert o.outputs[0].finish_reason == "length"
            assert o.outputs[0].stop_reason is None


@pytest.fixture(scope="module")
def eos_setup(llama_dir, greedy_ids, tmp_path_factory):
    """A copy of the llama checkpoint whose eos token is one the greedy run produces."""
    ids = greedy_ids[1]
    j = first_new_index(ids)
    eos = ids[j]
    path = copy_checkpoint(llama_dir, tmp_path_factory.mktemp("eos") / "ckpt")

    def set_eos(d):
        d["eos_token_id"] = eos

    edit_json(path / "config.json", set_eos)
    edit_json(path / "generation_config.json", set_eos)
    engine = make_llm(path)
    yield engine, ids, j, eos
    engine.shutdown()


def test_eos_stops_generation(eos_setup):
    engine, ids, j, eos = eos_setup
    assert eos in engine.config.model_config.eos_token_ids
    params = SamplingParams(temperature=0, max_tokens=24)
    comp = engine.generate(token_prompts([PROMPTS[1]]), params, use_tqdm=False)[0].outputs[0]
    assert comp.token_ids == ids[:j + 1]
    assert comp.finish_reason == "stop" and comp.stop_reason is None
    # ignore_eos runs on to max_tokens.
    comp = engine.generate(token_prompts([PROMPTS[1]]), params.clone(ignore_eos=True),
                           use_tqdm=False)[0].outputs[0]
    assert comp.token_ids == ids and comp.finish_reason == "length"


def test_min_tokens_delays_eos(eos_setup):
    engine, ids, j, eos = eos_setup
    m = j + 3
    params = SamplingParams(temperature=0, max_tokens=24, min_tokens=m)
    comp = engine.generate(token_prompts([PROMPTS[1]]), params, use_tqdm=False)[0].outputs[0]
    assert len(comp.token_ids) >= m
    assert comp.token_ids[:j] == ids[:j]
    assert eos not in comp.token_ids[:m]
    if len(comp.token_ids) < 24:
        assert comp.token_ids[-1] == eos and comp.finish_reason == "stop"


# ---- logprobs ------------------------------------------------------------------------------

def test_logprobs_match_transformers(llm, llama_dir):
    tok = llm.tokenizer
    params = SamplingParams(temperature=0, logprobs=5, max_tokens=8)
    outs = llm.generate(token_prompts(PROMPTS), params, use_tqdm=False)
    for p, o in zip(PROMPTS, outs):
        comp = o.outputs[0]
        assert len(comp.logprobs) == len(comp.token_ids) == 8
        ref = hf_logprobs(llama_dir, p + comp.token_ids)
        total = 0.0
        for i, (t, step) in enumerate(zip(comp.token_ids, comp.logprobs)):
            row = ref[len(p) - 1 + i]
            top5 = row.topk(5)
            assert set(step) == {t, *top5.indices.tolist()}
            assert t == top5.indices[0].item()
            assert step[t].rank == 1
            for rank, (tid, lp) in enumerate(zip(top5.indices.tolist(), top5.values.tolist()),
                                             start=1):
                assert step[tid].logprob == pytest.approx(lp, abs=1e-4)
                assert step[tid].rank == rank
                assert step[tid].decoded_token == tok.decode([tid], skip_special_tokens=False)
            total += step[t].logprob
        assert comp.cumulative_logprob == pytest.approx(total, abs=1e-4)


def test_logprobs_of_sampled_tokens_and_ranks(llm, llama_dir):
    params = SamplingParams(temperature=1.0, logprobs=2, max_tokens=10, ignore_eos=True,
                            seed=3)
    outs = llm.generate(token_prompts(PROMPTS), params, use_tqdm=False)
    outside_top2 = 0
    for p, o in zip(PROMPTS, outs):
        comp = o.outputs[0]
        ref = hf_logprobs(llama_dir, p + comp.token_ids)
        for i, (t, step) in enumerate(zip(comp.token_ids, comp.logprobs)):
            row = ref[len(p) - 1 + i]
            want_rank = int((row > row[t]).sum()) + 1
            assert step[t].rank == want_rank
            assert step[t].logprob == pytest.approx(row[t].item(), abs=1e-4)
            assert len(step) == (2 if want_rank <= 2 else 3)
            outside_top2 += want_rank > 2
    assert outside_top2 > 0  # the case where the sampled token is added to the top-n


def test_logprobs_zero_gives_sampled_token_only(llm, greedy_ids):
    outs = llm.generate(token_prompts(PROMPTS), greedy(6, logprobs=0), use_tqdm=False)
    for o, g in zip(outs, greedy_ids):
        comp = o.outputs[0]
        assert comp.token_ids == g[:6]
        assert [list(step) for step in comp.logprobs] == [[t] for t in g[:6]]
    plain = llm.generate(token_prompts(PROMPTS[:1]), greedy(6), use_tqdm=False)[0].outputs[0]
    assert plain.logprobs is None


@pytest.fixture(scope="module")
def chunked_llm(llama_dir):
    engine = make_llm(llama_dir, max_num_batched_tokens=16)
    yield engine
    engine.shutdown()


@pytest.mark.parametrize("which", ["default", "chunked"])
def test_prompt_logprobs_match_transformers(llm, chunked_llm, llama_dir, which):
    engine = llm if which == "default" else chunked_llm
    prompts = random_prompts((2, 17, 33, 50), seed=12)
    # Cache the prompts first: prompt logprobs must still be computed for every position.
    engine.generate(token_prompts(prompts), greedy(2), use_tqdm=False)
    outs = engine.generate(token_prompts(prompts), greedy(2, prompt_logprobs=0),
                           use_tqdm=False)
    for p, o in zip(prompts, outs):
        plp = o.prompt_logprobs
        assert plp is not None and len(plp) == len(p)
        assert plp[0] is None
        ref = hf_logprobs(llama_dir, p)
        for i in range(1, len(p)):
            assert list(plp[i]) == [p[i]]
            assert plp[i][p[i]].logprob == pytest.approx(ref[i - 1, p[i]].item(), abs=1e-4)
    assert outs[0].outputs[0].token_ids == generate_ids(engine, prompts[:1], greedy(2))[0]


def test_prompt_logprobs_with_preemption(llama_dir):
    """Requests preempted in the middle of a chunked prefill recompute their prompt: the
    prompt logprobs must still be one value per prompt position, equal to transformers'."""
    prompts = random_prompts((30, 64, 77, 100, 41, 90, 99, 80), seed=11)
    with make_llm(llama_dir, max_model_len=160, max_num_batched_tokens=16,
                  kv_cache_memory_bytes=12 * kv_block_bytes()) as engine:
        outs = engine.generate(token_prompts(prompts), greedy(32, prompt_logprobs=0),
                               use_tqdm=False)
        assert engine.get_stats()["num_preemptions"] > 0
    for p, o in zip(prompts, outs):
        ref = hf_logprobs(llama_dir, p)
        got = [o.prompt_logprobs[i][p[i]].logprob for i in range(1, len(p))]
        want = [ref[i - 1, p[i]].item() for i in range(1, len(p))]
        assert got == pytest.approx(want, abs=1e-4), f"prompt of {len(p)} tokens"


def test_prompt_logprobs_returns_top_k(llm, llama_dir):
    """prompt_logprobs=k (vLLM): each prompt position has its own token plus the top k."""
    p = random_prompts((20,), seed=13)[0]
    out = llm.generate(token_prompts([p]), greedy(1, prompt_logprobs=3), use_tqdm=False)[0]
    ref = hf_logprobs(llama_dir, p)
    for i in range(1, len(p)):
        top = ref[i - 1].topk(3).indices.tolist()
        assert set(out.prompt_logprobs[i]) == {p[i], *top}


# ---- the sampler itself ----------------------------------------------------------------------

def _frequencies(rows: int = 40000, temperature: float = 1.0, **kw) -> torch.Tensor:
    from fleetllm.model.layers.sampler import Sampler, SamplingMetadata

    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]]).repeat(rows, 1)
    full = {k: None if kw.get(k) is None else torch.full((rows,), kw[k])
            for k in ("top_k", "top_p", "min_p")}
    m = SamplingMetadata(torch.full((rows,), temperature), False, full["top_k"],
                         full["top_p"], full["min_p"], {}, None)
    sampled = Sampler(0)(logits, m).sampled
    return torch.bincount(sampled, minlength=6).float() / rows


@pytest.mark.parametrize("kw, keep", [
    ({}, 6), ({"temperature": 0.5}, 6), ({"temperature": 2.0}, 6), ({"top_k": 2}, 2),
    ({"top_p": 0.8}, 3), ({"min_p": 0.2}, 3), ({"top_k": 3, "top_p": 0.7}, 2),
])
def test_sampler_distribution(kw, keep):
    """40000 draws from one distribution: frequencies within 0.01 (4 sigma) of the
    softmax of logits / temperature, restricted to the tokens top-k/top-p/min-p keep."""
    temperature = kw.get("temperature", 1.0)
    freq = _frequencies(**kw)
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0]) / temperature
    logits[keep:] = float("-inf")  # the logits are sorted, so the kept set is a prefix
    want = torch.softmax(logits, dim=-1)
    assert torch.allclose(freq, want, atol=0.01), (freq, want)


def test_engine_seed(llama_dir):
    """Unseeded requests are reproducible for a given LLM(seed=...) and differ across seeds."""
    params = sample(max_tokens=12)
    runs = []
    for seed in (0, 0, 1):
        with make_llm(llama_dir, seed=seed) as engine:
            runs.append(generate_ids(engine, PROMPTS, params))
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


# ---- n > 1 -----------------------------------------------------------------------------------

def test_n_two_completions(llm):
    outs = llm.generate(token_prompts(PROMPTS[:2]), sample(n=2), use_tqdm=False)
    for o in outs:
        assert [c.index for c in o.outputs] == [0, 1]
        assert all(len(c.token_ids) == 16 for c in o.outputs)
        assert o.outputs[0].token_ids != o.outputs[1].token_ids
        assert o.outputs[0].text != o.outputs[1].text
    seeded = sample(n=2, seed=5)
    a = llm.generate(token_prompts(PROMPTS[:2]), seeded, use_tqdm=False)
    b = llm.generate(token_prompts(PROMPTS[:2]), seeded, use_tqdm=False)
    for x, y in zip(a, b):
        assert [c.token_ids for c in x.outputs] == [c.token_ids for c in y.outputs]
        assert x.outputs[0].token_ids != x.outputs[1].token_ids


def test_n_greedy_with_stop_string(llm):
    full = llm.generate("def fibonacci(n):", greedy(24), use_tqdm=False)[0].outputs[0]
    stop, idx = _pick_stop_string(full.text)
    out = llm.generate("def fibonacci(n):", greedy(24, n=3, stop=[stop]), use_tqdm=False)[0]
    assert len(out.outputs) == 3
    for c in out.outputs:
        assert c.text == full.text[:idx] and c.stop_reason == stop


# ---- penalties -------------------------------------------------------------------------------

def _reference_penalised_greedy(model_dir, prompt, steps, presence=0.0, frequency=0.0,
                                repetition=1.0) -> list[int]:
    """vLLM's penalties on transformers' logits: repetition over prompt + output tokens,
    presence and frequency over output tokens; then argmax."""
    model = hf_model(str(model_dir))
    out: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([prompt + out])).logits[0, -1].float()
            seen = torch.zeros_like(logits, dtype=torch.bool)
            seen[prompt + out] = True
            logits = torch.where(seen, torch.where(logits > 0, logits / repetition,
                                                   logits * repetition), logits)
            counts = torch.zeros_like(logits)
            for t in out:
                counts[t] += 1
            logits = logits - frequency * counts - presence * (counts > 0).float()
            out.append(int(logits.argmax()))
    return out


@pytest.mark.parametrize("kw", [
    {"presence_penalty": 1.5},
    {"frequency_penalty": 1.0},
    {"repetition_penalty": 1.3},
    {"presence_penalty": -0.5, "frequency_penalty": 0.7, "repetition_penalty": 0.8},
])
def test_penalties_match_reference(llm, llama_dir, greedy_ids, kw):
    got = generate_ids(llm, PROMPTS, greedy(12, **kw))
    ref_kw = {"presence": kw.get("presence_penalty", 0.0),
              "frequency": kw.get("frequency_penalty", 0.0),
              "repetition": kw.get("repetition_penalty", 1.0)}
    for p, g in zip(PROMPTS, got):
        assert g == _reference_penalised_greedy(llama_dir, p, 12, **ref_kw)
    assert got != [g[:12] for g in greedy_ids]  # the penalty changed something


def test_penalties_only_for_their_request(llm, greedy_ids):
    """A penalised request in the batch must not change its unpenalised neighbours."""
    params = [greedy(24), greedy(24, repetition_penalty=2.0), greedy(24), greedy(24)]
    got = generate_ids(llm, PROMPTS, params)
    assert got[0] == greedy_ids[0] and got[2:] == greedy_ids[2:]
    assert got[1] != greedy_ids[1]


def test_large_repetition_penalty_reduces_repeats(llm):
    prompts = random_prompts((3, 9, 17, 30, 41, 64), seed=0)
    plain = generate_ids(llm, prompts, greedy(32))
    penalised = generate_ids(llm, prompts, greedy(32, repetition_penalty=5.0))

    def repeats(seqs):
        return sum(len(s) - len(set(s)) for s in seqs)

    assert repeats(plain) > 0
    assert repeats(penalised) < repeats(plain)


# ---- logit_bias ------------------------------------------------------------------------------

def test_logit_bias_plus_100_forces_the_token(llm):
    tok = 123
    for params in (sample(max_tokens=12, logit_bias={tok: 100}),
                   greedy(12, logit_bias={tok: 100.0})):
        assert all(ids == [tok] * 12 for ids in generate_ids(llm, PROMPTS, params))


def test_logit_bias_minus_100_bans_the_greedy_token(llm, greedy_ids):
    for prompt, ids in zip(PROMPTS, greedy_ids):
        banned = max(set(ids), key=ids.count)
        got = generate_ids(llm, [prompt], greedy(24, logit_bias={banned: -100}))[0]
        assert banned not in got
        assert got[:ids.index(banned)] == ids[:ids.index(banned)]  # the same until then


def test_logit_bias_only_for_its_request(llm, greedy_ids):
    """Biases are placed on their own batch rows: the neighbours are unchanged."""
    params = [greedy(24), greedy(24, logit_bias={7: 100, 8: 50}), greedy(24), greedy(24)]
    got = generate_ids(llm, PROMPTS, params)
    assert got[0] == greedy_ids[0] and got[2:] == greedy_ids[2:]
    assert got[1] == [7] * 24


def test_logprobs_are_raw_under_logit_bias(llm, llama_dir):
    """As for penalties, logprobs are the model's log-softmax before the bias."""
    p = PROMPTS[0]
    out = llm.generate(token_prompts([p]), greedy(1, logit_bias={123: 100}, logprobs=0),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == [123]
    want = hf_logprobs(llama_dir, p)[-1, 123].item()
    assert out.logprobs[0][123].logprob == pytest.approx(want, abs=1e-4)
    assert want < -1.0  # a biased logprob would be ~0


@pytest.mark.parametrize("bias, match", [
    ({1: 100.5}, r"logit_bias\[1\] must be in \[-100, 100\]"),
    ({1: -101}, r"logit_bias\[1\] must be in \[-100, 100\]"),
    ({-1: 1.0}, "logit_bias keys must be token ids"),
    ({1: "high"}, r"logit_bias\[1\] must be a number"),
    ([1, 2], "logit_bias must be a dict"),
])
def test_logit_bias_invalid_values(bias, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(logit_bias=bias)


def test_logit_bias_out_of_vocab_rejected_before_queueing(llm):
    with pytest.raises(ValueError, match=r"logit_bias has token ids outside the vocabulary"):
        llm.generate(token_prompts(PROMPTS[:2]),
                     [greedy(4), greedy(4, logit_bias={300: 1.0})], use_tqdm=False)
    assert not llm.engine_core.has_unfinished_requests()
    # OpenAI's JSON sends token ids as strings.
    assert SamplingParams(logit_bias={"5": 1}).logit_bias == {5: 1.0}
