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


def test_bench_rpc(llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "rpc.json"
    r = fleetllm("bench", "rpc", "--model", str(llama_dir), "--backend", "uni",
                 "--num-calls", "50", "--output-json", str(out))
    assert r.returncode == 0, r.stderr
    assert json.loads(out.read_text())
