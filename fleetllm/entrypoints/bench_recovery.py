"""fleetllm bench recovery: what a killed worker and a killed engine core cost a workload.

One fault-free run, then one run of the same requests in which a worker process (SIGKILL)
and later the engine-core process (SIGKILL) are killed. For each kill it prints the time
from the kill to the first token produced after recovery, and the faulty run's throughput
against the fault-free one; every request must finish with all its tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from fleetllm.entrypoints.bench import random_prompts

# Outputs that reach the front end this soon after a kill were produced before it.
IN_FLIGHT_S = 0.01


def add_recovery_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--kill-worker-at", type=float, default=0.25,
                   help="kill a worker once this fraction of the output tokens is produced")
    p.add_argument("--kill-engine-at", type=float, default=0.6,
                   help="kill the engine core once this fraction is produced")
    p.add_argument("--output-json", default=None, help="also write the figures to this file")


def _engine_core_process() -> psutil.Process:
    cores = [p for p in psutil.Process().children() if p.name().startswith("fleetllm-core")]
    if len(cores) != 1:
        raise RuntimeError(f"expected one engine-core process, found {cores}")
    return cores[0]


def _worker_process(core: psutil.Process) -> psutil.Process:
    workers = [p for p in core.children()
               if "resource_tracker" not in " ".join(p.cmdline())]
    if not workers:
        raise RuntimeError("the engine core has no worker processes; use --tensor-parallel-size"
                           " 2 or --distributed-executor-backend mp")
    return workers[-1]


class _Run:
    """Drives the LLM's engine by hand, so each output's arrival time is known."""

    def __init__(self, llm: Any, prompts: list[list[int]], params: Any) -> None:
        self.llm, self.prompts, self.params = llm, prompts, params
        self.arrivals: list[tuple[float, int]] = []  # (time, tokens)
        self.kills: list[tuple[str, float]] = []

    def run(self, kill_at: dict[str, float]) -> float:
        llm = self.llm
        ids = [llm._add_request(None, p, self.params) for p in self.prompts]
        total = len(self.prompts) * self.params.max_tokens
        produced = 0
        pending = dict(sorted(kill_at.items(), key=lambda kv: kv[1]))
        done: set[str] = set()
        start = time.perf_counter()
        while llm.engine_core.has_unfinished_requests():
            outputs = llm.engine_core.step()
            tokens = sum(len(o.new_token_ids) for o in outputs)
            if tokens:
                self.arrivals.append((time.perf_counter(), tokens))
                produced += tokens
            finished, to_abort = llm.output_processor.process_outputs(outputs)
            done.update(ro.request_id for ro in finished)
            for what, fraction in list(pending.items()):
                if produced >= fraction * total:
                    del pending[what]
                    self._kill(what)
        elapsed = time.perf_counter() - start
        if done != set(ids):
            raise RuntimeError(f"{len(set(ids) - done)} requests did not finish")
        return elapsed

    def _kill(self, what: str) -> None:
        core = _engine_core_process()
        victim = _worker_process(core) if what == "worker" else core
        # From another thread, as an outside event: this one goes on reading outputs.
        threading.Thread(target=os.kill, args=(victim.pid, signal.SIGKILL)).start()
        self.kills.append((what, time.perf_counter()))

    def recovery_seconds(self) -> dict[str, float]:
        result = {}
        for what, killed in self.kills:
            after = [t for t, _ in self.arrivals if t > killed + IN_FLIGHT_S]
            result[what] = (after[0] - killed) if after else float("nan")
        return result


def run_recovery(args: argparse.Namespace, engine_kwargs: dict[str, Any]) -> dict[str, Any]:
    from fleetllm import LLM, SamplingParams

    kwargs = {**engine_kwargs, "skip_tokenizer_init": True, "engine_process": True}
    if kwargs.get("distributed_executor_backend") in (None, "uni"):
        kwargs["distributed_executor_backend"] = "mp"
    params = SamplingParams(temperature=0, ignore_eos=True, max_tokens=args.output_len)
    runs: dict[str, _Run] = {}
    elapsed: dict[str, float] = {}
    for name, kill_at in (("fault-free", {}),
                          ("with kills", {"worker": args.kill_worker_at,
                                          "engine core": args.kill_engine_at})):
        llm = LLM(**kwargs)
        try:
            vocab = llm.config.model_config.vocab_size
            prompts = random_prompts(vocab, args.num_prompts, args.input_len, args.seed)
            runs[name] = _Run(llm, prompts, params)
            elapsed[name] = runs[name].run(kill_at)
        finally:
            llm.shutdown()
    tokens = args.num_prompts * args.output_len
    recovery = runs["with kills"].recovery_seconds()
    result = {
        "num_prompts": args.num_prompts, "input_len": args.input_len,
        "output_len": args.output_len,
        "fault_free_output_tokens_per_s": tokens / elapsed["fault-free"],
        "with_kills_output_tokens_per_s": tokens / elapsed["with kills"],
        "throughput_ratio": elapsed["fault-free"] / elapsed["with kills"],
        "worker_kill_to_next_token_s": recovery.get("worker"),
        "engine_kill_to_next_token_s": recovery.get("engine core"),
        "requests_lost": 0,
    }
    print(f"Fault-free: {result['fault_free_output_tokens_per_s']:.1f} output tokens/s")
    print(f"With a worker and an engine core killed: "
          f"{result['with_kills_output_tokens_per_s']:.1f} output tokens/s "
          f"({result['throughput_ratio']:.2f} of fault-free); no request lost")
    for what, seconds in recovery.items():
        print(f"{what} killed -> next token: {seconds:.2f} s")
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(result, indent=2))
    return result
