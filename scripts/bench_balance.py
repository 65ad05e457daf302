"""Load balance with two front ends (as two API servers) over two engines, with and without
the DPCoordinator's published loads.

Front end A sends long and short requests alternately: balancing by its own counts, it puts
every long one on engine 0 and every short one on engine 1, and the short ones soon finish.
Front end B then sends a burst. By its own counts (it sent nothing yet) B splits the burst
evenly, so engine 0 ends up with far more; with the coordinator B sees A's long requests and
fills engine 1 first. Printed: each engine's requests (running and waiting, as the engines
count them) after B's burst.

    python scripts/bench_balance.py MODEL_DIR [--long 8 --burst 16]
"""

from __future__ import annotations

import argparse
import time

from fleetllm import SamplingParams
from fleetllm.config import EngineArgs
from fleetllm.engine.client import SyncMPClient
from fleetllm.engine.launch import EngineConnection, launch_core_engines
from fleetllm.engine.messages import EngineCoreRequest


def run(model: str, n_long: int, burst: int, coordinator: bool) -> list[int]:
    config = EngineArgs(model, kv_cache_memory_bytes=1 << 26).create_engine_config()
    manager, addresses, _ = launch_core_engines(config, 2, num_clients=2)
    a = b = None
    try:
        a, b = (SyncMPClient(config, connection=EngineConnection(addresses, i, 2))
                for i in range(2))
        if not coordinator:  # B balances by its own counts only
            b.loads.close()
            b.loads.sock = None
        long = SamplingParams(temperature=0, max_tokens=480, ignore_eos=True)
        short = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
        for k in range(2 * n_long):
            a.add_request(EngineCoreRequest(f"a{k}", [1, 2, 3, 4], long if k % 2 == 0
                                            else short, []))
        while any(f"a{k}" in a.requests for k in range(1, 2 * n_long, 2)):
            a.step()  # until the short ones are done
        time.sleep(0.3)  # a coordinator snapshot covers it
        for k in range(burst):
            b.add_request(EngineCoreRequest(f"b{k}", [1, 2, 3, 4], long, []))
        time.sleep(0.2)
        return [int(s["num_running"] + s["num_waiting"]) for s in a.call_utility("stats")]
    finally:
        for client in (a, b):
            if client is not None:
                client.shutdown()
        manager.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--long", type=int, default=8)
    p.add_argument("--burst", type=int, default=16)
    a = p.parse_args()
    for coordinator in (False, True):
        running = run(a.model, a.long, a.burst, coordinator)
        print(f"{'with' if coordinator else 'without'} the coordinator: requests on each "
              f"engine after the burst: {running}")


if __name__ == "__main__":
    main()
