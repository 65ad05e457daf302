"""Shared helpers for the fleetllm tests: engine construction, prompts, transformers references."""

from __future__ import annotations

import functools
import json
import os
import random
import shutil
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import torch

from fleetllm import LLM, SamplingParams

VOCAB = 300  # the vocabulary of conftest's tiny checkpoints
BLOCK_SIZE = 16
# Eight prompt lengths from 3 to 100, so batches mix short and long prefills.
LENGTHS = (3, 9, 17, 30, 41, 64, 77, 100)


def free_ports(n: int = 1) -> int:
    """A base port with n free ports after it, below the kernel's ephemeral range.

    A port picked by binding port 0 is in the ephemeral range, where Ray's processes, zmq's
    random binds and every outgoing connection later take theirs, so a test that released one
    could find it taken when the server bound it (CI: a KV connector's rank-1 port, taken while
    Ray started). Ports between Ray's worker ports (10002-19999) and the ephemeral range are
    taken only by explicit binds."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    start = 20000 if low - n > 21000 else 1024
    pick = random.Random()  # its own generator: a test's random.seed() must not repeat picks
    for _ in range(200):
        base = pick.randrange(start, low - n)
        socks = [socket.socket() for _ in range(n)]
        try:
            for i, s in enumerate(socks):
                s.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {n} consecutive free ports in {start}-{low}")


def make_llm(model: str | Path, **kwargs: Any) -> LLM:
    """An LLM on one CPU thread.

    Unless OMP_NUM_THREADS is set, the worker calls torch.set_num_threads(<cores>) when it
    starts; on a shared machine that oversubscribes the cores and makes every step of these
    tiny models ~100x slower, so the tests keep the process on one thread.
    """
    llm = LLM(str(model), **kwargs)
    torch.set_num_threads(1)
    return llm


def random_prompts(lengths: tuple[int, ...] = LENGTHS, seed: int = 0,
                   vocab: int = VOCAB) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab, (n,), generator=gen).tolist() for n in lengths]


def greedy(max_tokens: int = 32, **kwargs: Any) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kwargs)


def token_prompts(prompts: list[list[int]]) -> list[dict[str, list[int]]]:
    return [{"prompt_token_ids": p} for p in prompts]


def generate_ids(llm: LLM, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
                 ) -> list[list[int]]:
    outs = llm.generate(token_prompts(prompts), params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@functools.lru_cache(maxsize=16)
def hf_model(model_dir: str, dtype: torch.dtype = torch.float32):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    return model.eval()


def hf_greedy(model_dir: str | Path, prompts: list[list[int]], max_new_tokens: int = 32,
              dtype: torch.dtype = torch.float32) -> list[list[int]]:
    """transformers' greedy continuation of each prompt, one prompt at a time (no padding)."""
    model = hf_model(str(model_dir), dtype)
    out = []
    with torch.no_grad():
        for p in prompts:
            seq = model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=max_new_tokens,
                                 eos_token_id=None, pad_token_id=0)
            out.append(seq[0, len(p):].tolist())
    return out


def hf_logprobs(model_dir: str | Path, token_ids: list[int],
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[len(token_ids), vocab] float32 log_softmax of transformers' logits; row i predicts i+1."""
    model = hf_model(str(model_dir), dtype)
    with torch.no_grad():
        logits = model(torch.tensor([token_ids])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_json(path: Path, fn: Callable[[dict[str, Any]], None]) -> None:
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data, indent=2))


def mismatched_checkpoint(src: Path, tmp: Path) -> Path:
    """A copy whose config.json disagrees with its weights (intermediate_size 96, not 128):
    loading it fails with E004 naming the mlp tensor."""
    bad = copy_checkpoint(src, tmp / "bad")
    edit_json(bad / "config.json", lambda cfg: cfg.update(intermediate_size=96))
    return bad


def kv_block_bytes(num_layers: int = 2, num_kv_heads: int = 2, head_dim: int = 16,
                   itemsize: int = 4, block_size: int = BLOCK_SIZE) -> int:
    """Bytes of one KV-cache block over all layers (K and V)."""
    return 2 * block_size * num_kv_heads * head_dim * itemsize * num_layers


def engine_core_process(index: int = 0, root: int | None = None, timeout: float = 0.0,
                        other_than: int | None = None) -> psutil.Process:
    """The engine-core process `ps` shows as fleetllm-core{index} under root (default: this
    process), waiting up to timeout seconds for one whose pid is not other_than (a
    restarted engine takes a moment)."""
    name = f"fleetllm-core{index}"
    deadline = time.monotonic() + timeout
    while True:
        found = [p for p in psutil.Process(root).children(recursive=True)
                 if _name(p) == name and p.pid != other_than]
        if found:
            return found[0]
        assert time.monotonic() < deadline, f"no process named {name}"
        time.sleep(0.05)


def _name(proc: psutil.Process) -> str:
    """The name of a live process; "" for one that has ended."""
    try:
        return "" if proc.status() == psutil.STATUS_ZOMBIE else proc.name()
    except psutil.NoSuchProcess:
        return ""


def sigkill_engine_core(index: int = 0, root: int | None = None) -> int:
    """SIGKILLs the process named fleetllm-core{index}; returns its pid."""
    pid = engine_core_process(index, root).pid
    os.kill(pid, signal.SIGKILL)
    return pid


def kill_mid_generate(llm: LLM, kill: Callable[[], Any], after_tokens: int = 20) -> list[int]:
    """Makes llm's next generate() call kill() (an engine core) right after the first step
    in which some request has after_tokens output tokens, so every request is under way;
    returns a list that then holds how many tokens each unfinished request had."""
    client = llm.engine_core
    step = client.step
    delivered: list[int] = []

    def step_then_kill() -> Any:
        out = step()
        counts = [len(u.output_token_ids) for u in client.requests.values()]
        if max(counts, default=0) >= after_tokens:
            client.step = step
            delivered.extend(counts)
            kill()
        return out

    client.step = step_then_kill
    return delivered


def wakeups(pid: int, tid: int) -> int:
    """How often one thread has been switched out: each sleep it wakes from counts one.
    Polling every millisecond is ~1,000 a second; a thread that sleeps until it is woken
    has a handful. Wake-ups count exactly, where accounted CPU time on a VM does not (here a
    bare select() with a 50 ms timeout costs ~0.4 ms of CPU a wake, and other processes'
    CPU comes in 10 ms ticks), so tests of sleeping bound wake-ups, and CPU only loosely."""
    with open(f"/proc/{pid}/task/{tid}/status") as f:
        return sum(int(line.split()[1]) for line in f if "ctxt_switches" in line)
