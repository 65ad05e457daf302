"""Times the two LoRA delta strategies of fleetllm/lora/ops.py (dense, segmented) on one
fused qkv-shaped layer, to place their crossover (DENSE_MAX_WORK, DENSE_MAX_SLOT_RANK).

    python scripts/bench_lora_ops.py [--hidden 576] [--out 960] [--subs 3] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from fleetllm.lora.ops import LoRAMapping, add_lora


def time_one(x, a, b, columns, rank, mapping, out, reps: int) -> float:
    add_lora(out.clone(), x, a, b, columns, rank, mapping)
    start = time.perf_counter()
    for _ in range(reps):
        add_lora(out.clone(), x, a, b, columns, rank, mapping)
    return (time.perf_counter() - start) / reps * 1e3


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--out", type=int, default=960)
    p.add_argument("--subs", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--tokens", type=int, nargs="+", default=[64, 256, 1024, 8192])
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    rng = np.random.default_rng(0)
    dtype = getattr(torch, a.dtype)
    print("tokens slots rank  dense_ms  segmented_ms  base_linear_ms")
    for tokens in a.tokens:
        for slots in (1, 2, 4):
            for rank in (8, 16, 64):
                width = a.subs * rank
                x = torch.randn(tokens, a.hidden, dtype=dtype)
                w = torch.randn(a.out, a.hidden, dtype=dtype)
                la = torch.randn(slots * width, a.hidden, dtype=dtype)
                part = a.out // a.subs  # equal parts (q, k, v sizes differ in real models)
                columns = [(j * part, part) for j in range(a.subs)]
                lb = [torch.randn(slots * rank, part, dtype=dtype) for _ in range(a.subs)]
                out = x @ w.t()
                token_slots = rng.integers(-1, slots, tokens)
                token_slots[:slots] = np.arange(slots)
                reps = max(3, 4000 // tokens)
                times = []
                for dense in (True, False):
                    m = LoRAMapping()
                    m.prepare(token_slots, dtype, torch.device("cpu"), rank, dense)
                    times.append(time_one(x, la, lb, columns, rank, m, out, reps))
                start = time.perf_counter()
                for _ in range(reps):
                    x @ w.t()
                base = (time.perf_counter() - start) / reps * 1e3
                print(f"{tokens:6d} {slots:5d} {rank:4d} {times[0]:9.3f} {times[1]:13.3f} "
                      f"{base:15.3f}")


if __name__ == "__main__":
    main()
