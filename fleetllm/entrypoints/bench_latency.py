"""fleetllm bench latency: end-to-end latency of one small batch (as vLLM's), with output
tokens/s and the latency per output token; speculative decoding's acceptance when on."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from fleetllm.entrypoints.bench import add_workload_args, spec_decode_summary, workload_prompts


def add_latency_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--num-iters-warmup", type=int, default=1)
    p.add_argument("--num-iters", type=int, default=3)
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 = greedy (the default: the same tokens with and without "
                        "speculative decoding)")
    p.add_argument("--prompt", default=None,
                   help="a text prompt for every request instead of the token workload "
                        "(e.g. 'def fibonacci(n):'); needs the model's tokenizer")
    p.add_argument("--output-json", default=None, help="also write the figures to this file")
    add_workload_args(p)


def run_latency(args: argparse.Namespace, engine_kwargs: dict[str, Any]) -> dict[str, Any]:
    from fleetllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(**{**engine_kwargs, "skip_tokenizer_init": args.prompt is None})
    startup = time.perf_counter() - start
    try:
        vocab = llm.config.model_config.vocab_size
        prompts: list[Any] = (
            [args.prompt] * args.batch_size if args.prompt is not None else
            [{"prompt_token_ids": p}
             for p in workload_prompts(args, vocab, args.batch_size, args.input_len)])
        params = SamplingParams(temperature=args.temperature, ignore_eos=True,
                                max_tokens=args.output_len)
        for _ in range(args.num_iters_warmup):
            llm.generate(prompts, params, use_tqdm=False)
        latencies = []
        for _ in range(args.num_iters):
            start = time.perf_counter()
            outs = llm.generate(prompts, params, use_tqdm=False)
            latencies.append(time.perf_counter() - start)
            assert all(len(o.outputs[0].token_ids) == args.output_len for o in outs)
        stats = llm.get_stats()
    finally:
        llm.shutdown()
    lat = np.asarray(latencies)
    avg = float(lat.mean())
    result = {
        "batch_size": args.batch_size, "input_len": args.input_len,
        "output_len": args.output_len,
        "workload": "prompt" if args.prompt is not None else args.workload,
        "speculative_config": engine_kwargs.get("speculative_config"),
        "startup_s": round(startup, 3), "avg_latency_s": avg,
        "p50_latency_s": float(np.percentile(lat, 50)),
        "p90_latency_s": float(np.percentile(lat, 90)),
        "output_tokens_per_s": args.batch_size * args.output_len / avg,
        "ms_per_output_token": 1000 * avg / args.output_len,
    }
    print(f"Startup: {startup:.2f} s")
    print(f"Avg latency: {avg:.3f} s (p50 {result['p50_latency_s']:.3f} s, p90 "
          f"{result['p90_latency_s']:.3f} s) over {args.num_iters} iterations")
    print(f"Output: {result['output_tokens_per_s']:.2f} tokens/s, "
          f"{result['ms_per_output_token']:.2f} ms per output token (per request)")
    result.update(spec_decode_summary(stats))
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(result, indent=2))
    return result
