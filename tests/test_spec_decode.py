"""N-gram speculative decoding (issue 13): greedy exactness, the sampled distribution,
seeds, KV accounting, configuration errors."""

from __future__ import annotations

import functools
import random

import numpy as np
import pytest
import torch

import fleetllm.worker.spec_decode as spec_runner
from fleetllm import SamplingParams
from fleetllm.spec_decode.ngram_proposer import NgramProposer
from fleetllm.spec_decode.rejection_sampler import emitted_tokens
from tests.helpers import generate_ids, greedy, kv_block_bytes, make_llm, random_prompts

KV = 1 << 24


def spec(k: int = 3, **extra: int) -> dict:
    return {"method": "ngram", "num_speculative_tokens": k, **extra}


def repetitive_prompts(num: int = 8, seed: int = 1) -> list[list[int]]:
    """Prompts made of a repeated random block, so drafts from the context are found."""
    rng = random.Random(seed)
    out = []
    for i in range(num):
        block = [rng.randrange(1, 300) for _ in range(3 + i)]
        out.append((block * (40 // len(block) + 2))[:40 + i])
    return out


PROMPTS = repetitive_prompts() + random_prompts((3, 9, 17, 30, 41, 64, 77, 100), seed=5)


@functools.lru_cache(maxsize=8)
def _reference(path: str, max_tokens: int = 32) -> tuple:
    with make_llm(path, kv_cache_memory_bytes=KV, skip_tokenizer_init=True) as llm:
        return tuple(map(tuple, generate_ids(llm, PROMPTS, greedy(max_tokens))))


def _spec_ids(path, k: int, **kwargs) -> tuple[list[list[int]], dict]:
    with make_llm(path, kv_cache_memory_bytes=KV, skip_tokenizer_init=True,
                  speculative_config=spec(k), **kwargs) as llm:
        ids = generate_ids(llm, PROMPTS, greedy(32))
        return ids, llm.get_stats()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("k", [1, 3, 7])
def test_greedy_same_tokens(arch, k, ckpt):
    path = ckpt(arch)
    got, stats = _spec_ids(path, k)
    assert [tuple(g) for g in got] == list(_reference(str(path)))
    # Drafts were proposed and some accepted, or the test would show little.
    assert stats["spec_decode_num_accepted_tokens"] > 0


@pytest.mark.parametrize("backend", ["mp", "ray"])
def test_greedy_same_tokens_tp2(backend, llama_dir):
    if backend == "ray":
        pytest.importorskip("ray")
    got, _ = _spec_ids(llama_dir, 3, distributed_executor_backend=backend,
                       tensor_parallel_size=2)
    assert [tuple(g) for g in got] == list(_reference(str(llama_dir)))


@pytest.mark.parametrize("extra", [
    dict(presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.2,
         logit_bias={7: 2.0}),
    dict(kv_cache_memory_bytes=kv_block_bytes() * 20, max_model_len=256),  # preempts
])


def test_greedy_same_tokens_with_penalties_and_preemption(llama_dir, oracle, extra):
    """Penalties at each scored position count the accepted drafts before it (oracle
    drafts: right until a mistake would show); a preempted request's drafts and
    rolled-back slots leave nothing behind."""
    kv = extra.pop("kv_cache_memory_bytes", KV)
    engine = {"max_model_len": extra.pop("max_model_len")} if "max_model_len" in extra else {}
    runs = []
    for speculative in (None, spec(4)):
        with make_llm(llama_dir, kv_cache_memory_bytes=kv, skip_tokenizer_init=True,
                      speculative_config=speculative, **engine) as llm:
            runs.append(generate_ids(llm, PROMPTS, greedy(32, **extra)))
            stats = llm.get_stats()
        oracle.continuations = {tuple(p): o for p, o in zip(PROMPTS, runs[0])}
    assert runs[0] == runs[1]
    assert stats["spec_decode_acceptance_rate"] > 0.9
    if kv != KV:
        assert stats["num_preemptions"] > 0


class OracleProposer(NgramProposer):
    """Proposes the known greedy continuation (every draft accepted), or a fixed draft."""

    continuations: dict[tuple[int, ...], list[int]] = {}
    fixed: list[int] | None = None

    def propose(self, contexts):
        if self.fixed is not None:
            return [list(self.fixed[:self.k]) for _ in contexts]
        out = []
        for ctx in contexts:
            ctx = ctx.tolist()
            for prompt, cont in self.continuations.items():
                if tuple(ctx[:len(prompt)]) == prompt:
                    done = len(ctx) - len(prompt)
                    out.append(cont[done:done + self.k])
                    break
            else:
                out.append([])
        return out


@pytest.fixture
def oracle(monkeypatch):
    monkeypatch.setattr(spec_runner, "NgramProposer", OracleProposer)
    monkeypatch.setattr(spec_runner, "MAX_SKIP", 0)
    OracleProposer.continuations, OracleProposer.fixed = {}, None
    return OracleProposer


def test_stops_inside_an_accepted_run(llama_dir, oracle):
    """Stop strings, stop token ids and max_tokens that land inside a run of accepted
    drafts end the output exactly where they do without speculation."""
    prompts = [p for p in PROMPTS[8:12]]
    cases = []
    with make_llm(llama_dir, kv_cache_memory_bytes=KV) as llm:
        full = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(24),
                            use_tqdm=False)
        for p, o in zip(prompts, full):
            oracle.continuations[tuple(p)] = list(o.outputs[0].token_ids)
            text = o.outputs[0].text
            stop = text[len(text) // 2:len(text) // 2 + 3]
            for params in (greedy(24, stop=[stop]), greedy(11),
                           greedy(24, stop_token_ids=[o.outputs[0].token_ids[9]]),
                           greedy(24, min_tokens=12, stop_token_ids=[o.outputs[0].token_ids[5]])):
                cases.append((p, params))
        want = [llm.generate({"prompt_token_ids": p}, params, use_tqdm=False)[0].outputs[0]
                for p, params in cases]
    with make_llm(llama_dir, kv_cache_memory_bytes=KV, speculative_config=spec(7)) as llm:
        got = [llm.generate({"prompt_token_ids": p}, params, use_tqdm=False)[0].outputs[0]
               for p, params in cases]
        stats = llm.get_stats()
    for g, w in zip(got, want):
        assert (g.token_ids, g.text, g.finish_reason, g.stop_reason) == (
            w.token_ids, w.text, w.finish_reason, w.stop_reason)
    # The oracle's drafts are right until min_tokens' ban changes the text: long runs
    # were accepted, so the stops did land inside them.
    assert stats["spec_decode_num_accepted_tokens"] > 100


def test_seeded_request_alone_and_in_a_batch(llama_dir):
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=1234, max_tokens=32,
                            ignore_eos=True, logprobs=1)
    others = SamplingParams(temperature=1.0, max_tokens=32, ignore_eos=True)
    target = PROMPTS[2]
    with make_llm(llama_dir, kv_cache_memory_bytes=KV, skip_tokenizer_init=True,
                  speculative_config=spec(4)) as llm:
        alone = llm.generate({"prompt_token_ids": target}, params, use_tqdm=False)[0]
        batch = llm.generate([{"prompt_token_ids": p} for p in PROMPTS[:15]] +
                             [{"prompt_token_ids": target}], [others] * 15 + [params],
                             use_tqdm=False)[-1]
    with make_llm(llama_dir, kv_cache_memory_bytes=KV, skip_tokenizer_init=True) as llm:
        plain = llm.generate({"prompt_token_ids": target}, params, use_tqdm=False)[0]
    a, b, c = alone.outputs[0], batch.outputs[0], plain.outputs[0]
    assert a.token_ids == b.token_ids == c.token_ids
    assert len(a.logprobs) == len(a.token_ids)  # a logprob for every emitted token
    assert a.cumulative_logprob == pytest.approx(c.cumulative_logprob, abs=1e-4)


def _next_three(path, n: int, speculate: bool) -> np.ndarray:
    kwargs = dict(speculative_config=spec(2)) if speculate else {}
    with make_llm(path, kv_cache_memory_bytes=KV, skip_tokenizer_init=True,
                  max_num_seqs=1024, seed=7 if speculate else 8, **kwargs) as llm:
        params = SamplingParams(temperature=1.0, max_tokens=3, ignore_eos=True)
        ids = generate_ids(llm, [[1, 2, 3, 4]] * n, params)
    seqs = np.asarray(ids)
    return seqs[:, 0] * 256 + seqs[:, 1] * 16 + seqs[:, 2]


def _chi_square_p(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample chi-square test of homogeneity over the 3-token sequences, pooling the
    categories expected fewer than 5 times into one."""
    cats, inv = np.unique(np.concatenate([a, b]), return_inverse=True)
    table = np.stack([np.bincount(inv[:len(a)], minlength=len(cats)),
                      np.bincount(inv[len(a):], minlength=len(cats))]).astype(float)
    expected = table.sum(0) * table.sum(1, keepdims=True) / table.sum()
    rare = expected.min(0) < 5
    table = np.concatenate([table[:, ~rare], table[:, rare].sum(1, keepdims=True)], axis=1)
    table = table[:, table.sum(0) > 0]
    expected = table.sum(0) * table.sum(1, keepdims=True) / table.sum()
    stat = float(((table - expected) ** 2 / expected).sum())
    df = table.shape[1] - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0), torch.tensor(stat / 2.0)))


def test_distribution_matches_without_speculation(ckpt, oracle, monkeypatch):
    """20,000 samples of the next 3 tokens (vocab 16, temperature 1) with forced drafts
    for the second and third against 20,000 without speculation. At alpha = 0.001 a correct sampler fails
    one run in a thousand; the wrong rule (accept every draft) gives the drafted tokens
    probability 1 and is rejected with p far below that."""
    path = ckpt("llama", vocab_size=16)
    n = 20_000
    plain = _next_three(path, n, False)
    # Draft the most likely second and third tokens, so both acceptance and rejection
    # (with the residual draw) happen often.
    oracle.fixed = [int(np.bincount(plain // 16 % 16).argmax()),
                    int(np.bincount(plain % 16).argmax())]
    assert _chi_square_p(plain, _next_three(path, n, True)) > 1e-3
    accept_all = functools.partial(
        emitted_tokens, accept=lambda target, drafts: np.array([len(d) for d in drafts]))
    monkeypatch.setattr(spec_runner, "emitted_tokens", accept_all)
    assert _chi_square_p(plain, _next_three(path, n, True)) < 1e-3


def test_no_block_leaked_and_cache_holds_only_accepted_kv(llama_dir, oracle):
    """Drafts that are nearly always wrong, over 200+ steps: after every step a request
    holds exactly the blocks of its known tokens, all blocks come back at the end, and a
    prompt that reuses the cached prefix continues exactly as an uncached one."""
    oracle.fixed = [299, 298, 297]
    prompts = PROMPTS[:4]
    with make_llm(llama_dir, kv_cache_memory_bytes=KV, skip_tokenizer_init=True,
                  speculative_config=spec(3)) as llm:
        core = llm.engine_core
        sched = core.scheduler
        step, steps = core.step, []

        def checked_step():
            out = step()
            steps.append(1)
            for req in sched.running:
                held = len(sched.kv.req_blocks.get(req.request_id, []))
                assert held == -(-req.num_tokens // sched.kv.block_size)
            return out

        core.step = checked_step
        outs = generate_ids(llm, prompts, greedy(220))
        core.step = step
        pool = sched.kv.pool
        assert len(steps) >= 200
        assert pool.num_free_blocks == len(pool.blocks) - 1
        assert llm.get_stats()["spec_decode_num_draft_tokens"] > 400
        longer = [p + o[:150] for p, o in zip(prompts, outs)]
        hits = sched.kv.prefix_hits
        cached = generate_ids(llm, longer, greedy(20))
        assert sched.kv.prefix_hits - hits >= 4 * 9 * 16
    with make_llm(llama_dir, kv_cache_memory_bytes=KV, skip_tokenizer_init=True,
                  enable_prefix_caching=False) as llm:
        assert cached == generate_ids(llm, longer, greedy(20))


def test_structured_requests_do_not_speculate_in_a_speculating_batch(llama_dir):
    from fleetllm import StructuredOutputsParams

    text = [{"prompt_token_ids": p} for p in PROMPTS[:4]]
    regex = SamplingParams(temperature=0, max_tokens=32,
                           structured_outputs=StructuredOutputsParams(regex=r"\d{3}-\d{4}"))
    runs = []
    for speculative in (None, spec(3)):
        with make_llm(llama_dir, kv_cache_memory_bytes=KV,
                      speculative_config=speculative) as llm:
            outs = llm.generate(text * 2, [regex] * 4 + [greedy(32)] * 4, use_tqdm=False)
            runs.append([o.outputs[0].token_ids for o in outs])
            drafts = llm.get_stats().get("spec_decode_num_drafts", 0)
    assert runs[0] == runs[1]
    assert drafts > 0  # the others did speculate
