"""The fleetllm command: generate, chat, serve, bench."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from fleetllm.config import (
    DEFAULT_EXECUTE_MODEL_TIMEOUT_S,
    DEFAULT_MAX_WORKER_RESTARTS,
    DTYPES,
    LOAD_FORMATS,
)


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="local Hugging Face checkpoint directory (default: the built-in model)")
    p.add_argument("--dtype", choices=DTYPES, default="auto")
    p.add_argument("--load-format", choices=LOAD_FORMATS, default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching",
                   action="store_false")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--pipeline-parallel-size", type=int, default=1)
    p.add_argument("--distributed-executor-backend", default=None)
    p.add_argument("--max-worker-restarts", type=int, default=DEFAULT_MAX_WORKER_RESTARTS,
                   help="worker or engine restarts allowed per 10 minutes before the engine "
                        "gives up (0: no recovery)")
    p.add_argument("--execute-model-timeout-s", type=float,
                   default=DEFAULT_EXECUTE_MODEL_TIMEOUT_S,
                   help="a step that runs longer counts as hung: its workers are restarted")
    p.add_argument("--worker-extension-cls", default=None,
                   help="a 'package.module.Class' mixed into every worker")


def _llm_kwargs(a: argparse.Namespace) -> dict[str, Any]:
    return dict(model=a.model, dtype=a.dtype, load_format=a.load_format, seed=a.seed,
                max_model_len=a.max_model_len, max_num_seqs=a.max_num_seqs,
                max_num_batched_tokens=a.max_num_batched_tokens,
                kv_cache_memory_bytes=a.kv_cache_memory_bytes, block_size=a.block_size,
                enable_prefix_caching=a.enable_prefix_caching,
                tensor_parallel_size=a.tensor_parallel_size,
                pipeline_parallel_size=a.pipeline_parallel_size,
                distributed_executor_backend=a.distributed_executor_backend,
                max_worker_restarts=a.max_worker_restarts,
                execute_model_timeout_s=a.execute_model_timeout_s,
                worker_extension_cls=a.worker_extension_cls,
                skip_tokenizer_init=getattr(a, "skip_tokenizer_init", False))


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--sampling-seed", dest="sampling_seed", type=int, default=None)


def _sampling_params(a: argparse.Namespace):
    from fleetllm import SamplingParams

    return SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p,
                          top_k=a.top_k, seed=a.sampling_seed)


def cmd_generate(a: argparse.Namespace) -> int:
    from fleetllm import LLM

    params = _sampling_params(a)
    with LLM(**_llm_kwargs(a)) as llm:
        outputs = llm.generate(a.prompt, params, use_tqdm=False)
    for out in outputs:
        print(out.prompt + out.outputs[0].text)
        if len(outputs) > 1:
            print("-" * 40)
    return 0


def cmd_chat(a: argparse.Namespace) -> int:
    from fleetllm import LLM

    params = _sampling_params(a)
    history: list[dict[str, str]] = []
    if a.system:
        history.append({"role": "system", "content": a.system})
    with LLM(**_llm_kwargs(a)) as llm:
        interactive = sys.stdin.isatty()
        while True:
            if interactive:
                print("> ", end="", flush=True)
            line = sys.stdin.readline()
            if not line or line.strip() in ("/exit", "/quit"):
                return 0
            if not line.strip():
                continue
            history.append({"role": "user", "content": line.rstrip("\n")})
            reply = llm.chat(history, params, use_tqdm=False)[0].outputs[0].text
            history.append({"role": "assistant", "content": reply})
            print(reply, flush=True)


def cmd_serve(a: argparse.Namespace) -> int:
    from fleetllm.entrypoints.openai.server import run_server

    return run_server(a, _llm_kwargs(a))


def cmd_bench_throughput(a: argparse.Namespace) -> int:
    from fleetllm.entrypoints import bench

    if a.backend == "hf":
        if a.model is None:
            print("--backend hf needs --model DIR", file=sys.stderr)
            return 2
        bench.run_hf(a)
    else:
        bench.run_fleetllm(a, _llm_kwargs(a))
    return 0


def cmd_bench_serve(a: argparse.Namespace) -> int:
    from fleetllm.entrypoints.bench_serve import run_serve_bench

    return 0 if run_serve_bench(a)["completed"] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fleetllm", description=__doc__)
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete one or more prompts")
    _engine_args(gen)
    _sampling_args(gen)
    gen.add_argument("prompt", nargs="+")
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="an interactive chat that keeps the conversation")
    _engine_args(chat)
    _sampling_args(chat)
    chat.add_argument("--system", default=None, help="an optional system message")
    chat.set_defaults(func=cmd_chat)

    serve = sub.add_parser("serve", help="an OpenAI-compatible HTTP server")
    _engine_args(serve)
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (0.0.0.0 exposes the server to the network)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=os.environ.get("FLEETLLM_API_KEY"),
                       help="require 'Authorization: Bearer KEY' (default: $FLEETLLM_API_KEY)")
    serve.add_argument("--skip-tokenizer-init", action="store_true",
                       help="serve a checkpoint without a tokenizer: prompts as token ids, "
                            "outputs as token ids (logprobs) with empty text")
    serve.add_argument("--served-model-name", nargs="+", default=None,
                       help="the model name(s) clients use (default: the --model path)")
    serve.add_argument("--data-parallel-size", type=int, default=1,
                       help="engine cores, each with its own executor and KV cache")
    serve.add_argument("--data-parallel-backend", choices=["mp", "ray"], default="mp",
                       help="engine cores as processes (mp) or Ray actors (ray)")
    serve.add_argument("--api-server-count", type=int, default=1,
                       help="HTTP server processes sharing the port (each with its own "
                            "client of every engine core)")
    serve.set_defaults(func=cmd_serve)

    bench = sub.add_parser("bench", help="benchmarks")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    tp = bench_sub.add_parser("throughput", help="offline throughput on random prompts")
    _engine_args(tp)
    from fleetllm.entrypoints.bench import add_throughput_args

    add_throughput_args(tp)
    tp.set_defaults(func=cmd_bench_throughput)

    rpc = bench_sub.add_parser("rpc", help="collective_rpc round trip of a no-op")
    _engine_args(rpc)
    rpc.add_argument("--backend", choices=["uni", "mp", "ray"], default="mp")
    rpc.add_argument("--num-calls", type=int, default=2000)
    rpc.add_argument("--output-json", default=None)
    rpc.set_defaults(func=lambda a: bench_rpc(a))

    sv = bench_sub.add_parser("serve", help="latency and throughput of a running server")
    from fleetllm.entrypoints.bench_serve import add_serve_bench_args

    add_serve_bench_args(sv)
    sv.set_defaults(func=cmd_bench_serve)
    return parser


def bench_rpc(a: argparse.Namespace) -> int:
    from fleetllm.entrypoints import bench

    bench.run_rpc(a, _llm_kwargs(a))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, TypeError, RuntimeError) as e:
        if args.log_level.upper() == "DEBUG":
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
