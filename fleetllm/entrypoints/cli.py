"""The fleetllm command: generate, chat, serve, bench."""

from __future__ import annotations

import argparse
import functools
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


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every flag's default, unless its help already says it or there is none
    (choices are shown by argparse itself)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, argparse.SUPPRESS) or "default" in text:
            return text
        return super()._get_help_string(action) or text


def _engine_args(p: argparse.ArgumentParser, positional_model: bool = False) -> None:
    if positional_model:  # `fleetllm serve MODEL`, as in vLLM; --model still works
        p.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                       help="local Hugging Face checkpoint directory (same as --model)")
    p.add_argument("--model", default=None,
                   help="local Hugging Face checkpoint directory (default: the built-in model)")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="weights and activations; auto takes the checkpoint's")
    p.add_argument("--load-format", choices=LOAD_FORMATS, default="auto",
                   help="dummy: random weights of the checkpoint's shape (benchmarks)")
    p.add_argument("--seed", type=int, default=0,
                   help="the engine's seed (dummy weights, requests without a seed of their "
                        "own); a request's own seed is --sampling-seed or the API's seed")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="longest prompt plus output (default: the checkpoint's)")
    p.add_argument("--max-num-seqs", type=int, default=256,
                   help="most requests in one step")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="token budget of one step (default: max(8192, --max-num-seqs))")
    p.add_argument("--kv-cache-memory-bytes", type=int, default=None,
                   help="KV cache size per worker (default: sized to the model and memory)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV cache block")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                   default=True, help="share the KV blocks of common prompt prefixes")
    p.add_argument("-tp", "--tensor-parallel-size", type=int, default=1,
                   help="ranks that split each layer")
    p.add_argument("-pp", "--pipeline-parallel-size", type=int, default=1,
                   help="ranks that split the layers into stages")
    p.add_argument("--pp-layer-partition", default=None,
                   help="layers per pipeline stage, e.g. '2,1' (default: as even as "
                        "possible, the remainder to the stages before the last)")
    p.add_argument("--ray-placement", choices=["spread", "pack"], default="spread",
                   help="on a Ray cluster: spread pipeline stages and data-parallel engines "
                        "over the nodes, or pack them onto as few as possible (a "
                        "tensor-parallel group always stays on one node)")
    p.add_argument("--distributed-executor-backend", default=None,
                   help="uni, mp, ray, external_launcher, or a 'package.module.Class' "
                        "(default: uni for one rank, mp for more)")
    p.add_argument("--max-worker-restarts", type=int, default=DEFAULT_MAX_WORKER_RESTARTS,
                   help="worker or engine restarts allowed per 10 minutes before the engine "
                        "gives up (0: no recovery)")
    p.add_argument("--execute-model-timeout-s", type=float,
                   default=DEFAULT_EXECUTE_MODEL_TIMEOUT_S,
                   help="a step that runs longer counts as hung: its workers are restarted")
    p.add_argument("--worker-extension-cls", default=None,
                   help="a 'package.module.Class' mixed into every worker")
    p.add_argument("--speculative-config", default=None,
                   help='n-gram speculative decoding as JSON, e.g. \'{"method": "ngram", '
                        '"num_speculative_tokens": 4, "prompt_lookup_min": 2, '
                        '"prompt_lookup_max": 5}\'')
    p.add_argument("--enable-lora", action="store_true",
                   help="serve LoRA adapters (PEFT directories) on top of the base model")
    p.add_argument("--max-loras", type=int, default=1,
                   help="adapter slots next to the weights: distinct adapters in one step")
    p.add_argument("--max-lora-rank", type=int, default=16,
                   help="the largest adapter rank (r) accepted")
    p.add_argument("--max-cpu-loras", type=int, default=None,
                   help="adapters kept in host memory, LRU (default: --max-loras)")
    p.add_argument("--kv-transfer-config", default=None,
                   help='a KV connector as JSON, e.g. \'{"kv_connector": '
                        '"SharedStorageConnector", "kv_role": "kv_both", '
                        '"kv_connector_extra_config": {"shared_storage_path": "/tmp/kv"}}\'')


def _llm_kwargs(a: argparse.Namespace) -> dict[str, Any]:
    tag = getattr(a, "model_tag", None)
    if tag is not None and a.model is not None and tag != a.model:
        raise ValueError(f"two models given: {tag!r} and --model {a.model!r}; give one")
    return dict(model=a.model or tag, dtype=a.dtype, load_format=a.load_format, seed=a.seed,
                max_model_len=a.max_model_len, max_num_seqs=a.max_num_seqs,
                max_num_batched_tokens=a.max_num_batched_tokens,
                kv_cache_memory_bytes=a.kv_cache_memory_bytes, block_size=a.block_size,
                enable_prefix_caching=a.enable_prefix_caching,
                tensor_parallel_size=a.tensor_parallel_size,
                pipeline_parallel_size=a.pipeline_parallel_size,
                pp_layer_partition=a.pp_layer_partition,
                ray_placement=a.ray_placement,
                distributed_executor_backend=a.distributed_executor_backend,
                max_worker_restarts=a.max_worker_restarts,
                execute_model_timeout_s=a.execute_model_timeout_s,
                worker_extension_cls=a.worker_extension_cls,
                speculative_config=a.speculative_config,
                enable_lora=a.enable_lora, max_loras=a.max_loras,
                max_lora_rank=a.max_lora_rank, max_cpu_loras=a.max_cpu_loras,
                kv_transfer_config=getattr(a, "kv_transfer_config", None),
                skip_tokenizer_init=getattr(a, "skip_tokenizer_init", False))


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--sampling-seed", dest="sampling_seed", type=int, default=None,
                   help="the request's own seed: the same text whatever else runs")


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
    parser = argparse.ArgumentParser(prog="fleetllm", description=__doc__,
                                     formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"fleetllm {_version()}")
    parser.add_argument("--log-level", default="INFO", type=str.upper,
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="logging level")
    parser.set_defaults(func=lambda a: _print_help(parser))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub_parser = functools.partial(sub.add_parser, formatter_class=_HelpFormatter)

    gen = sub_parser("generate", help="complete one or more prompts")
    _engine_args(gen)
    _sampling_args(gen)
    gen.add_argument("prompt", nargs="+", help="one or more prompts")
    gen.set_defaults(func=cmd_generate)

    chat = sub_parser("chat", help="an interactive chat that keeps the conversation")
    _engine_args(chat)
    _sampling_args(chat)
    chat.add_argument("--system", default=None, help="an optional system message")
    chat.set_defaults(func=cmd_chat)

    serve = sub_parser("serve", help="an OpenAI-compatible HTTP server")
    _engine_args(serve, positional_model=True)
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (0.0.0.0 exposes the server to the network)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on")
    serve.add_argument("--api-key", default=os.environ.get("FLEETLLM_API_KEY"),
                       help="require 'Authorization: Bearer KEY' (default: $FLEETLLM_API_KEY)")
    serve.add_argument("--skip-tokenizer-init", action=argparse.BooleanOptionalAction,
                       default=False,
                       help="serve a checkpoint without a tokenizer: prompts as token ids, "
                            "outputs as token ids (logprobs) with empty text")
    serve.add_argument("--served-model-name", nargs="+", default=None,
                       help="the model name(s) clients use (default: the --model path, or "
                            "fleetllm-default for the built-in model)")
    serve.add_argument("-dp", "--data-parallel-size", type=int, default=1,
                       help="engine cores, each with its own executor and KV cache")
    serve.add_argument("--data-parallel-backend", choices=["mp", "ray"], default="mp",
                       help="engine cores as processes (mp) or Ray actors (ray)")
    serve.add_argument("--api-server-count", type=int, default=1,
                       help="HTTP server processes sharing the port (each with its own "
                            "client of every engine core)")
    serve.add_argument("--lora-modules", nargs="+", default=None, metavar="NAME=PATH",
                       help="LoRA adapters (PEFT directories) to serve from the start, each "
                            "picked by a request's model field (needs --enable-lora); also "
                            "'{\"name\": ..., \"path\": ...}'")
    serve.add_argument("--allow-runtime-lora-updating", action=argparse.BooleanOptionalAction,
                       default=False,
                       help="serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter")
    serve.add_argument("--enable-elastic-ep", action=argparse.BooleanOptionalAction,
                       default=False,
                       help="serve POST /scale_elastic_ep and GET /is_scaling_elastic_ep, "
                            "which grow or shrink --data-parallel-size while serving (one "
                            "API server)")
    from fleetllm.entrypoints.openai import defaults as server_defaults

    serve.add_argument("--max-request-body-bytes", type=int,
                       default=server_defaults.DEFAULT_MAX_REQUEST_BODY_BYTES,
                       help="larger request bodies get 413 before they are read")
    serve.add_argument("--max-n", type=int, default=server_defaults.DEFAULT_MAX_N,
                       help="the most completions one request may ask for (n); above it, 400")
    serve.add_argument("--max-prompts-per-request", type=int,
                       default=server_defaults.DEFAULT_MAX_PROMPTS_PER_REQUEST,
                       help="the most prompts one /v1/completions request may carry, and "
                            "completions (n x prompts, or --max-n if larger); above it, 400")
    serve.add_argument("--enable-auto-tool-choice", action=argparse.BooleanOptionalAction,
                       default=False,
                       help='serve tool_choice "auto" (what a request with tools gets '
                            "unless it names another): --tool-call-parser reads the output "
                            "for tool calls")
    serve.add_argument("--tool-call-parser", choices=server_defaults.TOOL_CALL_PARSERS,
                       default=None,
                       help="the format the model writes tool calls in, for tool_choice "
                            '"auto" (hermes: <tool_call>{json}</tool_call>, as Hermes and Qwen '
                            "models write them); default: none")
    serve.add_argument("--shutdown-timeout", type=float,
                       default=server_defaults.DEFAULT_SHUTDOWN_TIMEOUT_S,
                       help="seconds in-flight requests get to finish after SIGTERM (new "
                            "ones get 503); then streams end with an error event")
    serve.set_defaults(func=cmd_serve)

    from fleetllm.entrypoints.disagg_proxy import add_proxy_args, run_proxy

    proxy = sub_parser("proxy", help="disaggregated prefill: one endpoint in front of a "
                                     "prefill server and a decode server")
    add_proxy_args(proxy)
    proxy.set_defaults(func=run_proxy)

    bench = sub_parser("bench", help="benchmarks")
    bench.set_defaults(func=lambda a: _print_help(bench))
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="BENCHMARK")
    bench_parser = functools.partial(bench_sub.add_parser, formatter_class=_HelpFormatter)
    tp = bench_parser("throughput", help="offline throughput on random prompts")
    _engine_args(tp)
    from fleetllm.entrypoints.bench import add_throughput_args

    add_throughput_args(tp)
    tp.set_defaults(func=cmd_bench_throughput)

    lat = bench_parser("latency", help="latency of one small batch: output tokens/s and "
                                       "the latency per output token")
    _engine_args(lat)
    from fleetllm.entrypoints.bench_latency import add_latency_args

    add_latency_args(lat)
    lat.set_defaults(func=lambda a: bench_latency(a))

    rpc = bench_parser("rpc", help="collective_rpc round trip of a no-op")
    _engine_args(rpc)
    rpc.add_argument("--backend", choices=["uni", "mp", "ray"], default="mp",
                     help="the executor backend to time")
    rpc.add_argument("--num-calls", type=int, default=2000, help="timed calls per mode")
    rpc.add_argument("--output-json", default=None, help="also write the figures to this file")
    rpc.set_defaults(func=lambda a: bench_rpc(a))

    rec = bench_parser("recovery", help="a worker and an engine core killed during "
                               "a workload: time to the next token, throughput, no loss")
    _engine_args(rec)
    from fleetllm.entrypoints.bench_recovery import add_recovery_args

    add_recovery_args(rec)
    rec.set_defaults(func=lambda a: bench_recovery(a))

    sv = bench_parser("serve", help="latency and throughput of a running server")
    from fleetllm.entrypoints.bench_serve import add_serve_bench_args

    add_serve_bench_args(sv)
    sv.set_defaults(func=cmd_bench_serve)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fleetllm")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


def _print_help(parser: argparse.ArgumentParser) -> int:
    """A command given without its subcommand lists the subcommands."""
    parser.print_help()
    return 2


def bench_recovery(a: argparse.Namespace) -> int:
    from fleetllm.entrypoints.bench_recovery import run_recovery

    run_recovery(a, _llm_kwargs(a))
    return 0


def bench_latency(a: argparse.Namespace) -> int:
    from fleetllm.entrypoints.bench_latency import run_latency

    run_latency(a, _llm_kwargs(a))
    return 0


def bench_rpc(a: argparse.Namespace) -> int:
    from fleetllm.entrypoints import bench

    bench.run_rpc(a, _llm_kwargs(a))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, TypeError, RuntimeError) as e:
        if args.log_level == "DEBUG":
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
