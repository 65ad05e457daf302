"""Elastic data parallel figures: how long a scale-up takes (the request until every new
engine serves) and a scale-down (the request until the removed engines are gone, with
nothing to drain), for a checkpoint or config directory, on engine processes or Ray actors.

    python scripts/bench_elastic.py examples/configs/smollm-135m --backend mp --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import time

from fleetllm import LLM, SamplingParams


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--backend", choices=["mp", "ray"], default="mp")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--to", type=int, default=2, help="scale 1 -> TO -> 1")
    a = p.parse_args()
    llm = LLM(a.model, load_format="dummy", dtype="bfloat16", engine_process=True,
              skip_tokenizer_init=True,
              data_parallel_backend=a.backend, kv_cache_memory_bytes=1 << 28)
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    ups, downs = [], []
    try:
        for _ in range(a.rounds):
            start = time.perf_counter()
            llm.scale_data_parallel(a.to)
            ups.append(time.perf_counter() - start)
            llm.generate([{"prompt_token_ids": [1, 2, 3]}] * 4, params, use_tqdm=False)
            start = time.perf_counter()
            llm.scale_data_parallel(1, drain_timeout=0)
            downs.append(time.perf_counter() - start)
    finally:
        llm.shutdown()
    print(f"backend {a.backend}, 1 -> {a.to} -> 1, {a.rounds} rounds")
    print(f"scale up:   median {statistics.median(ups):.2f} s  (all: "
          f"{', '.join(f'{t:.2f}' for t in ups)})")
    print(f"scale down: median {statistics.median(downs):.2f} s  (all: "
          f"{', '.join(f'{t:.2f}' for t in downs)})")


if __name__ == "__main__":
    main()
