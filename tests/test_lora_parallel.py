"""Multi-LoRA parity with transformers + peft across worker processes: tensor parallel
(each rank holds its shard of every adapter; the row-parallel delta joins the partial sum
before the all-reduce) and pipeline parallel (each stage holds its own layers' adapters),
over mp and Ray; a bad adapter fails on every rank and the engine goes on."""

from __future__ import annotations

import os
import signal

import pytest

from fleetllm.errors import LoRAAdapterError
from fleetllm.lora.request import LoRARequest
from tests.helpers import random_prompts
from tests.lora_helpers import make_adapters, make_core, references, run

pytest.importorskip("peft", reason="the LoRA tests need peft: pip install -e .[test]")

PROMPTS = random_prompts((3, 9, 17, 30, 41, 64, 77, 100, 5, 12, 20, 33), seed=3)
MAX_TOKENS = 12


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def setup(request, ckpt, tmp_path_factory):
    base = ckpt(request.param)
    loras = make_adapters(base, tmp_path_factory.mktemp(f"plora_{request.param}"))
    per = [None if i % 4 == 3 else loras[i % 3] for i in range(len(PROMPTS))]
    return request.param, base, per, references(base, PROMPTS, per, MAX_TOKENS)


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray", reason="the ray backend needs Ray: pip install -e .[ray]")
    ray.init(num_cpus=4, include_dashboard=False)
    yield
    ray.shutdown()


def _check(setup, tmp_path, **engine) -> None:
    arch, base, per, want = setup
    core = make_core(base, **engine)
    try:
        got = run(core, PROMPTS, per, MAX_TOKENS)
        assert core.list_loras() == {1, 2, 3}
        with pytest.raises(LoRAAdapterError, match="does not exist"):
            core.add_lora(LoRARequest("gone", 9, str(tmp_path / "gone")))
        assert run(core, PROMPTS[:2], per[:2], MAX_TOKENS) == want[:2]  # still serving
    finally:
        core.shutdown()
    for i, (g, w) in enumerate(zip(got, want)):
        assert g == w, f"{arch} prompt {i} under {per[i]} differs from transformers + peft"


def test_mp_tensor_parallel(setup, tmp_path):
    _check(setup, tmp_path, distributed_executor_backend="mp", tensor_parallel_size=2)


def test_mp_pipeline_parallel(setup, tmp_path):
    if setup[0] != "llama":
        pytest.skip("one architecture is enough for the pipeline split")
    _check(setup, tmp_path, distributed_executor_backend="mp", pipeline_parallel_size=2)


def test_ray_tensor_parallel(setup, tmp_path, ray_session):
    if setup[0] != "llama":
        pytest.skip("one architecture is enough for the Ray transport")
    _check(setup, tmp_path, distributed_executor_backend="ray", tensor_parallel_size=2)


def test_killed_worker_reloads_adapters(setup):
    """The restarted workers have no adapters: they read them again from each request's
    lora_path, and the pinned one is pinned again."""
    arch, base, per, want = setup
    if arch != "llama":
        pytest.skip("one architecture is enough for recovery")
    core = make_core(base, distributed_executor_backend="mp", tensor_parallel_size=2)
    steps = []

    def kill_after_four() -> None:
        steps.append(1)
        if len(steps) == 4:
            os.kill(core.executor.procs[1].pid, signal.SIGKILL)

    try:
        core.add_lora(per[1])
        core.pin_lora(per[1].lora_int_id)
        got = run(core, PROMPTS, per, MAX_TOKENS, on_step=kill_after_four)
        assert core.num_worker_restarts == 1
        assert per[1].lora_int_id in core.list_loras()
    finally:
        core.shutdown()
    assert got == want
