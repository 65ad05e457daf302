"""The fleetllm command line, run as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def fleetllm(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fleetllm.entrypoints.cli", *args],
                          capture_output=True, text=True, input=stdin, timeout=300, env=ENV)


def test_generate_prints_prompt_and_completion(llama_dir: Path) -> None:
    r = fleetllm("generate", "--model", str(llama_dir), "--max-tokens", "4", "def f(x):", "abc")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("def f(x):")
    assert "\nabc" in r.stdout


def test_chat_keeps_the_conversation(llama_dir: Path) -> None:
    r = fleetllm("chat", "--model", str(llama_dir), "--max-tokens", "3", stdin="hi\nmore\n")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip().splitlines()) >= 1


def test_missing_model_is_a_clear_error(tmp_path: Path) -> None:
    r = fleetllm("generate", "--model", str(tmp_path / "nope"), "hello")
    assert r.returncode == 1
    assert "does not exist" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("backend", ["fleetllm", "hf"])
def test_bench_throughput_both_backends(llama_dir: Path, tmp_path: Path, backend: str) -> None:
    out = tmp_path / f"{backend}.json"
    r = fleetllm("bench", "throughput", "--model", str(llama_dir), "--load-format", "dummy",
                 "--backend", backend, "--num-prompts", "3", "--input-len", "8",
                 "--output-len", "4", "--output-json", str(out))
    assert r.returncode == 0, r.stderr
    assert "output tokens/s" in r.stdout
    result = json.loads(out.read_text())
    assert result["backend"] == backend and result["output_tokens_per_s"] > 0


def test_bench_throughput_with_random_loras(llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "lora.json"
    r = fleetllm("bench", "throughput", "--model", str(llama_dir), "--load-format", "dummy",
                 "--enable-lora", "--num-loras", "3", "--max-lora-rank", "8",
                 "--num-prompts", "6", "--input-len", "8", "--output-len", "4",
                 "--output-json", str(out))
    assert r.returncode == 0, r.stderr
    assert "LoRA: 3 random adapters of rank 8, max_loras=3" in r.stdout
    assert json.loads(out.read_text())["output_tokens_per_s"] > 0


def test_bench_rpc(llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "rpc.json"
    r = fleetllm("bench", "rpc", "--model", str(llama_dir), "--backend", "uni",
                 "--num-calls", "50", "--output-json", str(out))
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text())


# ---- vLLM's command-line habits ------------------------------------------------------------

def _parse(*args: str):
    from fleetllm.entrypoints.cli import _llm_kwargs, build_parser

    a = build_parser().parse_args(list(args))
    return a, _llm_kwargs(a)


def test_version_and_bare_commands_list_their_subcommands() -> None:
    r = fleetllm("--version")
    assert r.returncode == 0 and r.stdout.startswith("fleetllm ")
    for args, names in (((), ("generate", "serve", "bench")),
                        (("bench",), ("throughput", "rpc", "recovery", "serve"))):
        r = fleetllm(*args)
        assert r.returncode == 2 and all(n in r.stdout for n in names), r.stdout + r.stderr


def test_help_shows_defaults_and_choices() -> None:
    r = fleetllm("serve", "--help")
    assert r.returncode == 0
    text = " ".join(r.stdout.split())
    assert "{auto,float32,bfloat16,float16}" in text and "(default: 256)" in text
    assert "--enable-prefix-caching, --no-enable-prefix-caching" in text
    assert "--seed" in text and "--sampling-seed" in text


def test_short_flags_positional_model_and_boolean_flags(tmp_path: Path) -> None:
    a, kwargs = _parse("serve", str(tmp_path), "-tp", "2", "-pp", "3", "-dp", "4",
                       "--no-enable-prefix-caching")
    assert kwargs["model"] == str(tmp_path) and a.data_parallel_size == 4
    assert kwargs["tensor_parallel_size"] == 2 and kwargs["pipeline_parallel_size"] == 3
    assert kwargs["enable_prefix_caching"] is False
    _, kwargs = _parse("serve", "--model", str(tmp_path), "--enable-prefix-caching")
    assert kwargs["model"] == str(tmp_path) and kwargs["enable_prefix_caching"] is True
    with pytest.raises(ValueError, match="two models"):
        _parse("serve", "a", "--model", "b")
