"""ExecutorWithExternalLauncher under a real `torchrun --nproc-per-node=2`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fleetllm import LLM, SamplingParams
from fleetllm.errors import ConfigurationError

ROOT = Path(__file__).resolve().parents[1]


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    return [torch.randint(1, 300, (4 + 7 * i,), generator=g).tolist() for i in range(8)]


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_torchrun_ranks_agree_with_uni(llama_dir: Path, tmp_path: Path, tp: int, pp: int) -> None:
    prompts = _prompts()
    out = tmp_path / "out.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2",
           "--master-port", str(29500 + os.getpid() % 1000 + tp),
           str(ROOT / "examples" / "torchrun_generate.py"), "--model", str(llama_dir),
           "--tensor-parallel-size", str(tp), "--pipeline-parallel-size", str(pp),
           "--max-tokens", "16", "--kv-cache-memory-bytes", str(1 << 24),
           "--prompt-token-ids", json.dumps(prompts), "--output-json", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    rank0 = json.loads(Path(f"{out}.rank0").read_text())
    rank1 = json.loads(Path(f"{out}.rank1").read_text())
    assert rank0 == rank1, "every rank must return the same outputs"
    llm = LLM(str(llama_dir), kv_cache_memory_bytes=1 << 24)
    try:
        params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
        ref = [o.outputs[0].token_ids for o in llm.generate(
            [{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)]
    finally:
        llm.shutdown()
    assert sum(a == b for a, b in zip(ref, rank0)) >= 7


def test_without_torchrun_is_a_clear_error(llama_dir: Path, monkeypatch) -> None:
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ConfigurationError, match="start the script with torchrun"):
        LLM(str(llama_dir), distributed_executor_backend="external_launcher",
            tensor_parallel_size=2)
