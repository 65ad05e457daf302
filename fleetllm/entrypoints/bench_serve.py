"""fleetllm bench serve: latency and throughput of a running server, like vLLM's serving bench.

Random token-id prompts go to POST /v1/completions as streams; the figures are vLLM's: TTFT,
TPOT (decode time over the tokens after the first) and ITL (gaps between streamed chunks).
Requests are greedy with ignore_eos, as in vLLM's serving bench, so each makes --output-len tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

PERCENTILE_FIGURES = (("ttft", "Time to First Token", "TTFT"),
                      ("tpot", "Time per Output Token (excl. 1st token)", "TPOT"),
                      ("itl", "Inter-token Latency", "ITL"))


@dataclass
class RequestResult:
    prompt_len: int
    success: bool = False
    output_tokens: int = 0
    ttft: float = 0.0  # seconds from sending to the first chunk with a choice
    latency: float = 0.0  # seconds from sending to the last chunk with a choice
    itl: list[float] = field(default_factory=list)
    error: str = ""


def add_serve_bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="default: the first of GET /v1/models")
    p.add_argument("--api-key", help="default: $FLEETLLM_API_KEY or $OPENAI_API_KEY",
                   default=os.environ.get("FLEETLLM_API_KEY", os.environ.get("OPENAI_API_KEY")))
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-concurrency", type=int, default=None, help="default: unlimited")
    p.add_argument("--request-rate", type=float, default=math.inf,
                   help="Poisson arrivals at this many requests/s (default: all at once)")
    p.add_argument("--seed", type=int, default=0,
                   help="the prompts' seed; a repeated seed hits the server's prefix cache")
    p.add_argument("--output-json", default=None, help="also write the figures to this file")


def _error_text(r: httpx.Response) -> str:
    try:
        message = r.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = r.text[:500]
    return f"HTTP {r.status_code}: {message}"


def _setup(args: argparse.Namespace, headers: dict[str, str]) -> tuple[str, int]:
    """The model name and the vocabulary size, from the server."""
    with httpx.Client(base_url=args.base_url, headers=headers, timeout=30) as client:
        try:
            r = client.get("/v1/models")
        except httpx.TransportError as e:
            raise RuntimeError(f"cannot reach the server at {args.base_url} ({e}); "
                               "is `fleetllm serve` running there?") from e
        if r.status_code != 200:
            raise RuntimeError(f"GET {args.base_url}/v1/models failed: {_error_text(r)}")
        model = args.model or r.json()["data"][0]["id"]
        # No endpoint states the vocabulary size, but an out-of-range id is refused naming it.
        r = client.post("/detokenize", json={"tokens": [2**31 - 1]})
        found = re.search(r"outside \[0, (\d+)\)", r.text)
        if found is None:
            raise RuntimeError(f"cannot learn the vocabulary size from POST {args.base_url}"
                               f"/detokenize ({_error_text(r)}); is this a fleetllm server?")
    return model, int(found.group(1))


async def _request(client: httpx.AsyncClient, body: dict[str, Any],
                   prompt_len: int) -> RequestResult:
    result = RequestResult(prompt_len)
    chunks = 0
    usage: dict[str, int] | None = None
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                result.error = _error_text(r)
                return result
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    result.error = f"error event: {data['error'].get('message')}"
                    return result
                if data.get("choices"):
                    now = time.perf_counter()
                    if chunks == 0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    chunks, last = chunks + 1, now
                usage = data.get("usage") or usage
    except (httpx.HTTPError, ValueError) as e:
        result.error = f"{type(e).__name__}: {e}"
        return result
    result.latency = last - start
    if usage is not None:
        result.prompt_len, result.output_tokens = usage["prompt_tokens"], usage["completion_tokens"]
    else:
        result.output_tokens = chunks  # at least one token a chunk
    result.success = result.output_tokens >= body["max_tokens"]
    if not result.success:
        result.error = f"{result.output_tokens} tokens generated of {body['max_tokens']} asked"
    return result


async def _run(args: argparse.Namespace, model: str, prompts: list[list[int]],
               gaps: list[float], headers: dict[str, str]) -> tuple[list[RequestResult], float]:
    limit = args.max_concurrency or len(prompts)
    slots = asyncio.Semaphore(limit)
    pool = httpx.Limits(max_connections=limit, max_keepalive_connections=limit)
    async with httpx.AsyncClient(base_url=args.base_url, headers=headers, limits=pool,
                                 timeout=httpx.Timeout(None, connect=30)) as client:
        async def one(ids: list[int]) -> RequestResult:
            body = {"model": model, "prompt": ids, "max_tokens": args.output_len,
                    "temperature": 0.0, "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}}
            async with slots:
                return await _request(client, body, len(ids))

        start = time.perf_counter()
        tasks = []
        for ids, gap in zip(prompts, gaps):
            await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(one(ids)))
        results = await asyncio.gather(*tasks)
    return list(results), time.perf_counter() - start


def compute_metrics(results: list[RequestResult], duration: float) -> dict[str, Any]:
    """vLLM's serving figures (and JSON keys) from per-request timings; times in ms."""
    ok = [r for r in results if r.success]
    inputs, outputs = sum(r.prompt_len for r in ok), sum(r.output_tokens for r in ok)
    metrics: dict[str, Any] = {
        "completed": len(ok), "failed": len(results) - len(ok), "duration": duration,
        "total_input_tokens": inputs, "total_output_tokens": outputs,
        "request_throughput": len(ok) / duration, "output_throughput": outputs / duration,
        "total_token_throughput": (inputs + outputs) / duration}
    samples = {"ttft": [r.ttft for r in ok],
               "tpot": [(r.latency - r.ttft) / (r.output_tokens - 1)
                        for r in ok if r.output_tokens > 1],
               "itl": [gap for r in ok for gap in r.itl]}
    for name, values in samples.items():
        ms = np.asarray(values or [0.0]) * 1000
        metrics[f"mean_{name}_ms"] = float(ms.mean())
        metrics[f"median_{name}_ms"] = float(np.median(ms))
        metrics[f"p99_{name}_ms"] = float(np.percentile(ms, 99))
    return metrics


def format_report(m: dict[str, Any]) -> str:
    rows = [("Successful requests:", m["completed"]), ("Failed requests:", m["failed"]),
            ("Benchmark duration (s):", m["duration"]),
            ("Total input tokens:", m["total_input_tokens"]),
            ("Total generated tokens:", m["total_output_tokens"]),
            ("Request throughput (req/s):", m["request_throughput"]),
            ("Output token throughput (tok/s):", m["output_throughput"]),
            ("Total token throughput (tok/s):", m["total_token_throughput"])]
    lines = ["{s:{c}^50}".format(s=" Serving Benchmark Result ", c="=")]
    lines += [f"{k:<40} {v:<10.2f}" if isinstance(v, float) else f"{k:<40} {v:<10}"
              for k, v in rows]
    for key, title, short in PERCENTILE_FIGURES:
        lines.append("{s:{c}^50}".format(s=title, c="-"))
        for stat in ("Mean", "Median", "P99"):
            label = f"{stat} {short} (ms):"
            lines.append(f"{label:<40} {m[f'{stat.lower()}_{key}_ms']:<10.2f}")
    lines.append("=" * 50)
    return "\n".join(lines)


def run_serve_bench(args: argparse.Namespace) -> dict[str, Any]:
    if min(args.num_prompts, args.input_len, args.output_len) < 1:
        raise ValueError("--num-prompts, --input-len and --output-len must be at least 1")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not a line per request
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    model, vocab = _setup(args, headers)
    rng = np.random.default_rng(args.seed)
    prompts = rng.integers(0, vocab, size=(args.num_prompts, args.input_len)).tolist()
    gaps = [0.0] * args.num_prompts  # seconds before each request: all at once, or Poisson
    if math.isfinite(args.request_rate):
        gaps[1:] = rng.exponential(1 / args.request_rate, args.num_prompts - 1).tolist()
    results, duration = asyncio.run(_run(args, model, prompts, gaps, headers))
    failures = [r.error for r in results if not r.success]
    if failures:
        print(f"{len(failures)} of {len(results)} requests failed; the first: {failures[0]}",
              file=sys.stderr)
    metrics = compute_metrics(results, duration)
    print(format_report(metrics))
    if args.output_json:
        rate = args.request_rate if math.isfinite(args.request_rate) else "inf"
        config = {"base_url": args.base_url, "model": model, "num_prompts": args.num_prompts,
                  "input_len": args.input_len, "output_len": args.output_len,
                  "max_concurrency": args.max_concurrency, "request_rate": rate}
        Path(args.output_json).write_text(json.dumps({**config, **metrics}, indent=2))
    return metrics
