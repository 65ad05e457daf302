"""Cost of one n-gram proposal step: 64 requests with 1,000-token contexts (the figure the
README compares with a decode step). Usage: python scripts/bench_ngram_proposer.py"""

from __future__ import annotations

import time

import numpy as np

from fleetllm.config import SpeculativeConfig
from fleetllm.sampling_params import SamplingParams
from fleetllm.worker.model_runner import CachedRequestState
from fleetllm.worker.spec_decode import SpecDecodeRunner


def main(num: int = 64, length: int = 1000, iters: int = 200) -> None:
    rng = np.random.default_rng(0)
    for kind in ("random", "repetitive"):
        if kind == "random":
            ctx = rng.integers(0, 49152, size=(num, length))
        else:
            ctx = np.tile(rng.integers(0, 49152, size=(num, 16)), length // 16 + 1)[:, :length]
        runner = SpecDecodeRunner(SpeculativeConfig(num_speculative_tokens=4), 16)
        states = [CachedRequestState(str(i), c.tolist(), 100, SamplingParams(), [], 0, [])
                  for i, c in enumerate(ctx)]
        emitted = [[int(c[-16])] for c in ctx]
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            runner._propose(states, emitted)
            times.append(time.perf_counter() - start)
            runner.take_draft_token_ids()
        print(f"{kind}: {num} requests x {length} tokens: {1e3 * np.mean(times[10:]):.2f} ms "
              f"per proposal step (p90 {1e3 * np.percentile(times[10:], 90):.2f} ms)")


if __name__ == "__main__":
    main()
