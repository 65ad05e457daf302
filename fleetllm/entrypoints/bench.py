"""fleetllm bench throughput: the offline workload through fleetllm or transformers."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np


def add_throughput_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=["fleetllm", "hf"], default="fleetllm")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--output-json", default=None, help="also write the figures to this file")


def random_prompts(vocab: int, num: int, length: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab, size=(num, length)).tolist()


def _report(args: argparse.Namespace, elapsed: float, startup: float) -> dict[str, Any]:
    n, i, o = args.num_prompts, args.input_len, args.output_len
    result = {
        "backend": args.backend, "num_prompts": n, "input_len": i, "output_len": o,
        "elapsed_s": round(elapsed, 3), "startup_s": round(startup, 3),
        "requests_per_s": n / elapsed, "total_tokens_per_s": n * (i + o) / elapsed,
        "output_tokens_per_s": n * o / elapsed,
    }
    print(f"Startup: {startup:.2f} s")
    print(f"Throughput: {result['requests_per_s']:.2f} requests/s, "
          f"{result['total_tokens_per_s']:.2f} total tokens/s, "
          f"{result['output_tokens_per_s']:.2f} output tokens/s")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(result, indent=2))
    return result


def run_fleetllm(args: argparse.Namespace, engine_kwargs: dict[str, Any]) -> dict[str, Any]:
    from fleetllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(**{**engine_kwargs, "skip_tokenizer_init": True})
    startup = time.perf_counter() - start
    try:
        vocab = llm.config.model_config.vocab_size
        prompts = random_prompts(vocab, args.num_prompts, args.input_len, args.seed)
        # The same sampling settings as vLLM's throughput benchmark.
        params = SamplingParams(temperature=1.0, top_p=1.0, ignore_eos=True,
                                max_tokens=args.output_len)
        start = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=True)
        elapsed = time.perf_counter() - start
        assert all(len(o.outputs[0].token_ids) == args.output_len for o in outs)
    finally:
        llm.shutdown()
    return _report(args, elapsed, startup)


def run_hf(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers

    start = time.perf_counter()
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    if args.load_format == "dummy":
        config = transformers.AutoConfig.from_pretrained(args.model)
        dtype = dtype or getattr(config, "dtype", None) or torch.float32
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype or "auto")
    model.eval()
    startup = time.perf_counter() - start
    prompts = random_prompts(model.config.vocab_size, args.num_prompts, args.input_len, args.seed)
    input_ids = torch.tensor(prompts)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                             do_sample=False, max_new_tokens=args.output_len,
                             min_new_tokens=args.output_len, pad_token_id=0)
    elapsed = time.perf_counter() - start
    assert out.shape[1] == args.input_len + args.output_len
    return _report(args, elapsed, startup)


def run_rpc(args: argparse.Namespace, engine_kwargs: dict[str, Any]) -> dict[str, Any]:
    """Round trip of a no-op collective_rpc, at the executor and through LLM."""
    from fleetllm import LLM

    engine_kwargs = {**engine_kwargs, "distributed_executor_backend": args.backend}
    llm = LLM(**engine_kwargs)
    try:
        executor = llm.engine_core.executor
        result: dict[str, Any] = {"backend": args.backend, "world_size":
                                  llm.config.parallel_config.world_size,
                                  "num_calls": args.num_calls}
        for where, call in (("executor", lambda: executor.collective_rpc("check_health")),
                            ("llm", lambda: llm.collective_rpc("check_health"))):
            for _ in range(min(200, args.num_calls)):
                call()
            times = np.empty(args.num_calls)
            for i in range(args.num_calls):
                start = time.perf_counter_ns()
                call()
                times[i] = time.perf_counter_ns() - start
            p50, p99 = np.percentile(times / 1e3, [50, 99])
            result[f"{where}_p50_us"], result[f"{where}_p99_us"] = float(p50), float(p99)
            print(f"{where:>8} collective_rpc no-op: p50 {p50:.1f} us, p99 {p99:.1f} us")
    finally:
        llm.shutdown()
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(result, indent=2))
    return result
