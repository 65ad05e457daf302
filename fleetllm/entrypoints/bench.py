"""fleetllm bench throughput: the offline workload through fleetllm or transformers."""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
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
    add_workload_args(p)
    p.add_argument("--num-loras", type=int, default=0,
                   help="with --enable-lora: this many random adapters of rank "
                        "--max-lora-rank, the prompts spread over them in turn (--max-loras "
                        "is raised to it, so all run together)")
    p.add_argument("--structured-output", choices=["json"], default=None,
                   help="json: every request's output follows a small JSON schema (an array "
                        "of at least output-len small objects, so the grammar cannot end "
                        "early); needs a tokenizer, and a model without one gets fleetllm's "
                        "built-in tokenizer")


def random_prompts(vocab: int, num: int, length: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab, size=(num, length)).tolist()


def add_workload_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workload", choices=["random", "repetitive"], default="random",
                   help="random: uniform random token ids; repetitive: each prompt is one "
                        "random block of --block-len tokens repeated (output that continues "
                        "the cycle suits n-gram speculative decoding)")
    p.add_argument("--block-len", type=int, default=16,
                   help="the repeated block's length for --workload repetitive")


def workload_prompts(args: argparse.Namespace, vocab: int, num: int, length: int
                     ) -> list[list[int]]:
    if getattr(args, "workload", "random") == "random":
        return random_prompts(vocab, num, length, args.seed)
    blocks = random_prompts(vocab, num, args.block_len, args.seed)
    return [(b * (length // len(b) + 1))[:length] for b in blocks]


def spec_decode_summary(stats: dict[str, float]) -> dict[str, float]:
    """Prints and returns the acceptance figures of a run with speculative decoding."""
    if "spec_decode_num_drafts" not in stats:
        return {}
    out = {k: v for k, v in stats.items() if k.startswith("spec_decode_")}
    print(f"Speculative decoding: {int(out['spec_decode_num_drafts'])} drafts, "
          f"{int(out['spec_decode_num_draft_tokens'])} draft tokens, acceptance rate "
          f"{100 * out['spec_decode_acceptance_rate']:.1f}%, mean acceptance length "
          f"{out['spec_decode_mean_acceptance_length']:.2f}")
    return out


def bench_schema(min_items: int) -> dict[str, Any]:
    item = {"type": "object", "additionalProperties": False,
            "required": ["id", "ok", "tag", "name"],
            "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999},
                           "ok": {"type": "boolean"},
                           "tag": {"enum": ["red", "green", "blue"]},
                           "name": {"type": "string", "maxLength": 8}}}
    return {"type": "array", "items": item, "minItems": min_items}


def _with_tokenizer(model: str | None, tmp: str) -> str:
    """model, or (when it has no tokenizer.json) a folder of links to its files plus
    fleetllm's built-in tokenizer, whose vocabulary the masks pad to the model's."""
    from fleetllm.default_model import DEFAULT_MODEL_DIR

    if model is None or (Path(model) / "tokenizer.json").is_file():
        return model
    out = Path(tmp) / "model"
    out.mkdir()
    for f in Path(model).iterdir():
        (out / f.name).symlink_to(f.resolve())
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEFAULT_MODEL_DIR / name, out / name)
    print(f"{model} has no tokenizer.json: using fleetllm's built-in tokenizer for the masks")
    return str(out)


def _report(args: argparse.Namespace, elapsed: float, startup: float,
            num_output_tokens: int | None = None) -> dict[str, Any]:
    n, i, o = args.num_prompts, args.input_len, args.output_len
    out_toks = n * o if num_output_tokens is None else num_output_tokens
    result = {
        "backend": args.backend, "num_prompts": n, "input_len": i, "output_len": o,
        "structured_output": getattr(args, "structured_output", None),
        "elapsed_s": round(elapsed, 3), "startup_s": round(startup, 3),
        "requests_per_s": n / elapsed, "total_tokens_per_s": (n * i + out_toks) / elapsed,
        "output_tokens": out_toks, "output_tokens_per_s": out_toks / elapsed,
    }
    print(f"Startup: {startup:.2f} s")
    print(f"Throughput: {result['requests_per_s']:.2f} requests/s, "
          f"{result['total_tokens_per_s']:.2f} total tokens/s, "
          f"{result['output_tokens_per_s']:.2f} output tokens/s")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(result, indent=2))
    return result


def run_fleetllm(args: argparse.Namespace, engine_kwargs: dict[str, Any]) -> dict[str, Any]:
    from fleetllm import LLM, SamplingParams, StructuredOutputsParams

    structured = getattr(args, "structured_output", None)
    with tempfile.TemporaryDirectory() as tmp:
        kwargs = {**engine_kwargs, "skip_tokenizer_init": structured is None}
        if structured:
            kwargs["model"] = _with_tokenizer(kwargs.get("model"), tmp)
        num_loras = getattr(args, "num_loras", 0)
        if num_loras:
            if not kwargs.get("enable_lora"):
                raise ValueError("--num-loras needs --enable-lora")
            kwargs["max_loras"] = max(kwargs.get("max_loras") or 1, num_loras)
            kwargs["max_cpu_loras"] = max(kwargs.get("max_cpu_loras") or 1, num_loras)
        start = time.perf_counter()
        llm = LLM(**kwargs)
        startup = time.perf_counter() - start
        try:
            vocab = llm.config.model_config.vocab_size
            prompts = workload_prompts(args, vocab, args.num_prompts, args.input_len)
            loras = _random_loras(llm, num_loras, tmp, len(prompts))
            # The same sampling settings as vLLM's throughput benchmark.
            params = SamplingParams(temperature=1.0, top_p=1.0, ignore_eos=True,
                                    max_tokens=args.output_len)
            if structured:
                params = params.clone(structured_outputs=StructuredOutputsParams(
                    json=bench_schema(args.output_len)))
                # Importing xgrammar and compiling the schema happen once per engine and
                # schema, not per token: done (and reported) before the timed run.
                start = time.perf_counter()
                llm.generate([{"prompt_token_ids": prompts[0]}], params.clone(max_tokens=1),
                             use_tqdm=False)
                print(f"Grammar set-up (import, compile, one token): "
                      f"{time.perf_counter() - start:.2f} s")
            start, cpu_start = time.perf_counter(), time.process_time()
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                use_tqdm=True, lora_request=loras)
            elapsed = time.perf_counter() - start
            cpu = time.process_time() - cpu_start
            spec_stats = spec_decode_summary(llm.get_stats())
        finally:
            llm.shutdown()
    lengths = [len(o.outputs[0].token_ids) for o in outs]
    if structured:
        print(f"Structured output: {sum(n < args.output_len for n in lengths)} of "
              f"{len(lengths)} requests ended with their grammar before output-len")
    else:
        assert all(n == args.output_len for n in lengths)
    result = _report(args, elapsed, startup, sum(lengths))
    # This process's CPU time: steadier than wall time on a shared machine, and complete
    # when the workers run in this process (the uni executor).
    result["cpu_s"] = round(cpu, 3)
    result["output_tokens_per_cpu_s"] = sum(lengths) / cpu
    result.update(spec_stats)
    print(f"CPU time of this process: {cpu:.2f} s "
          f"({result['output_tokens_per_cpu_s']:.2f} output tokens per CPU second)")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(result, indent=2))
    return result


def _random_loras(llm: Any, num: int, tmp: str, num_prompts: int) -> list[Any] | None:
    """num random adapters of rank max_lora_rank, loaded before the timed run; prompt k
    runs under adapter k % num."""
    if not num:
        return None
    from fleetllm import LoRARequest
    from fleetllm.lora.random_adapter import write_random_adapter

    rank = llm.config.lora_config.max_lora_rank
    loras = [LoRARequest(f"bench{k}", k + 1, str(write_random_adapter(
        llm.config.model_config, Path(tmp) / f"lora{k}", rank, seed=k))) for k in range(num)]
    for lora in loras:
        llm.add_lora(lora)
    print(f"LoRA: {num} random adapters of rank {rank}, max_loras="
          f"{llm.config.lora_config.max_loras}")
    return [loras[k % num] for k in range(num_prompts)]


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
