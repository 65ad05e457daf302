"""Speculative decoding's parts on their own: configuration errors, the proposer, the
acceptance rule, metrics, the CLI and the benchmarks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fleetllm import LLM
from fleetllm.config import EngineArgs, SpeculativeConfig
from fleetllm.errors import ConfigurationError
from fleetllm.spec_decode.ngram_proposer import NgramProposer
from fleetllm.spec_decode.rejection_sampler import emitted_tokens
from tests.test_spec_decode import KV, spec


def test_emitted_tokens_stop_at_the_first_rejection():
    # request 0: drafts [5, 6] and target [5, 7, 9] -> 5 accepted, then 7; request 1: no
    # draft -> its one token; request 2: both accepted -> plus the bonus 4.
    sampled = [5, 7, 9, 8, 1, 2, 4]
    assert emitted_tokens(sampled, [[5, 6], [], [1, 2]]) == [[5, 7], [8], [1, 2, 4]]


def test_proposer_finds_the_most_recent_longest_match():
    p = NgramProposer(4, 2, 5)
    ctx = [np.array(c) for c in ([1, 2, 3, 4, 5, 1, 2, 3], [7, 8, 9], [5, 5, 5, 5],
                                 [1, 2, 9, 9, 1, 2, 8, 8, 1, 2], [3])]
    assert p.propose(ctx) == [[4, 5, 1, 2], [], [5, 5, 5, 5], [8, 8, 1, 2], []]


@pytest.mark.parametrize("value, match", [
    ({"method": "eagle"}, "not supported"),
    ({"num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"prompt_lookup_min": 4, "prompt_lookup_max": 2}, "prompt_lookup_min"),
    ({"k": 3}, "unknown keys"),
    ("{not json", "not valid JSON"),
])
def test_bad_config_is_refused(value, match):
    with pytest.raises(ConfigurationError, match=match):
        SpeculativeConfig.from_user(value)


@pytest.mark.parametrize("extra, match", [
    (dict(pipeline_parallel_size=2, distributed_executor_backend="mp"), "pipeline"),
    (dict(async_scheduling=True), "async_scheduling"),
])
def test_refused_combinations(llama_dir, extra, match):
    with pytest.raises(ConfigurationError, match=match):
        EngineArgs(model=str(llama_dir), speculative_config=spec(), **extra
                   ).create_engine_config()


def test_llm_accepts_json_string(llama_dir):
    with LLM(str(llama_dir), kv_cache_memory_bytes=KV, skip_tokenizer_init=True,
             speculative_config='{"method": "ngram", "num_speculative_tokens": 2}') as llm:
        assert llm.config.speculative_config == SpeculativeConfig(num_speculative_tokens=2)


def test_prometheus_counters_and_stats():
    from prometheus_client import CollectorRegistry, generate_latest

    from fleetllm.spec_decode.metrics import SpecDecodingStats, prometheus_families

    stats = SpecDecodingStats(2)
    stats.observe(2, 1)
    stats.observe(2, 2)
    d = stats.as_dict()
    assert d["spec_decode_acceptance_rate"] == 0.75
    assert d["spec_decode_mean_acceptance_length"] == 2.5

    class Engines:
        def collect(self):
            return prometheus_families([d])

    registry = CollectorRegistry()
    registry.register(Engines())
    text = generate_latest(registry).decode()
    for line in ('fleetllm:spec_decode_num_drafts_total{engine="0"} 2.0',
                 'fleetllm:spec_decode_num_draft_tokens_total{engine="0"} 4.0',
                 'fleetllm:spec_decode_num_accepted_tokens_total{engine="0"} 3.0',
                 'fleetllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",'
                 'position="1"} 1.0'):
        assert line in text
    assert list(prometheus_families([{"num_running": 0}])) == []


@pytest.mark.parametrize("bench", ["latency", "throughput"])
def test_bench_with_speculation(llama_dir, tmp_path, bench):
    from tests.test_cli import fleetllm

    out = tmp_path / "out.json"
    r = fleetllm("bench", bench, "--model", str(llama_dir), "--workload", "repetitive",
                 "--block-len", "4", "--input-len", "24", "--output-len", "12",
                 *(["--num-iters", "1"] if bench == "latency" else ["--num-prompts", "2"]),
                 "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}',
                 "--output-json", str(out))
    assert r.returncode == 0, r.stderr
    assert "acceptance rate" in r.stdout and "tokens/s" in r.stdout
    result = json.loads(out.read_text())
    # bench throughput samples at temperature 1 (the tiny model does not keep the cycle);
    # bench latency is greedy, and the tiny model does.
    assert result["spec_decode_num_draft_tokens"] > 0 or bench == "throughput"


def test_cli_flag():
    from fleetllm.entrypoints.cli import _llm_kwargs, build_parser

    value = '{"method": "ngram", "num_speculative_tokens": 4}'
    for cmd in (["generate", "hi"], ["bench", "latency"], ["bench", "throughput"]):
        args = build_parser().parse_args([*cmd, "--speculative-config", value])
        assert _llm_kwargs(args)["speculative_config"] == value
