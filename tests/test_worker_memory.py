"""Worker memory: out-of-memory in a step is the typed E001, and sleep(level=2) gives the
weights' memory back to the OS."""

from __future__ import annotations

import gc
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import torch

from fleetllm import SamplingParams
from fleetllm.errors import OutOfMemoryError
from fleetllm.sched.output import CachedRequestData, NewRequestData, SchedulerOutput
from tests.helpers import generate_ids, greedy, make_llm, random_prompts

KV = 1 << 22


def _step(lengths: tuple[int, ...] = (10, 6)) -> SchedulerOutput:
    """A first step of len(lengths) new requests, one KV block each."""
    reqs = [NewRequestData(f"r{i}", list(range(1, n + 1)), n, SamplingParams(max_tokens=1),
                           [i + 1], 0, []) for i, n in enumerate(lengths)]
    return SchedulerOutput(reqs, CachedRequestData(), {r.req_id: r.num_prompt_tokens
                                                       for r in reqs}, sum(lengths), [])


def _failing_forward(error: type[BaseException]) -> Callable[..., None]:
    def forward(*args: object, **kwargs: object) -> None:
        raise error("simulated: cannot allocate 12 MiB")

    return forward


@pytest.mark.parametrize("error", [torch.OutOfMemoryError, MemoryError])
def test_oom_in_a_step_is_e001_naming_the_step_and_the_knobs(llama_dir: Path,
                                                             error: type) -> None:
    llm = make_llm(llama_dir, kv_cache_memory_bytes=KV, max_num_seqs=8)
    try:
        worker = llm.engine_core.executor.driver_worker.worker
        worker.model_runner.model.forward = _failing_forward(error)
        with pytest.raises(OutOfMemoryError) as info:
            llm.engine_core.executor.execute_model(_step())
        text = str(info.value)
        assert text.startswith("[E001] worker rank 0 ran out of host memory")
        assert "16 tokens over 2 sequences" in text and "simulated" in text
        assert "max_num_batched_tokens" in text and "max_num_seqs (now 8)" in text
        assert "max_model_len" in text
        assert isinstance(info.value.__cause__, error)
        # half-updated states are dropped, so a retry sends the requests whole
        assert not set(worker.model_runner.requests) & {"r0", "r1"}
    finally:
        llm.shutdown()


def test_oom_on_an_mp_worker_arrives_as_e001(llama_dir: Path) -> None:
    llm = make_llm(llama_dir, kv_cache_memory_bytes=KV, distributed_executor_backend="mp")
    try:
        def break_forward(worker: object) -> None:
            def forward(*args: object, **kwargs: object) -> None:
                raise torch.OutOfMemoryError("simulated: CUDA out of memory")

            worker.model_runner.model.forward = forward

        llm.collective_rpc(break_forward)
        with pytest.raises(OutOfMemoryError, match=r"E001.*16 tokens over 2 sequences.*"
                                                   r"lower max_num_batched_tokens"):
            llm.engine_core.executor.execute_model(_step())
    finally:
        llm.shutdown()


def test_sleep_level_2_gives_the_weights_memory_back(ckpt: Callable[..., Path]) -> None:
    # ~49 MB of float32 weights in tensors under glibc's mmap threshold (which
    # tune_cpu_allocator raises to 32 MiB): they live in the heap, as loaded weights do.
    model = ckpt(hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=2)
    llm = make_llm(model, kv_cache_memory_bytes=1 << 20, max_model_len=64)
    try:
        prompts = random_prompts((5, 9))
        ref = generate_ids(llm, prompts, greedy(8))
        weights = llm.collective_rpc("get_memory_usage")[0]["weights_bytes"]
        assert weights > 40e6
        gc.collect()
        before = psutil.Process().memory_info().rss
        llm.sleep(level=2)
        after = psutil.Process().memory_info().rss
        assert before - after >= weights / 2, (
            f"RSS fell by {(before - after) / 2**20:.1f} MiB of {weights / 2**20:.1f} MiB "
            "of weights")
        llm.wake_up()
        assert generate_ids(llm, prompts, greedy(8)) == ref
    finally:
        llm.shutdown()
