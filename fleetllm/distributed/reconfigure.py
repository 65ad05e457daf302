"""Elastic data parallel: what an engine's executor is told when the fleet grows or shrinks
(vLLM's names)."""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass


class ReconfigureRankType(enum.IntEnum):
    """Special values of ReconfigureDistributedRequest.new_data_parallel_rank."""

    KEEP_CURRENT_RANK = -1
    SHUTDOWN_CURRENT_RANK = -2


@dataclass(frozen=True)
class ReconfigureDistributedRequest:
    new_data_parallel_size: int
    new_data_parallel_rank: int  # a rank, or a ReconfigureRankType
    new_data_parallel_rank_local: int = ReconfigureRankType.KEEP_CURRENT_RANK
    new_data_parallel_master_ip: str = "127.0.0.1"
    new_data_parallel_master_port: int = 0
    # fleetllm: each worker's torch thread count after the change (None: leave it), so that
    # the engines on one CPU machine never oversubscribe its cores.
    num_threads: int | None = None


SHARED_CORES_ENV = "FLEETLLM_SHARED_CORES"  # set where fleetllm chose the thread counts


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)


def threads_per_rank(data_parallel_size: int, world_size: int) -> int:
    """Each rank's share of this machine's cores when data_parallel_size engines of
    world_size ranks each share it."""
    return max(1, available_cores() // (data_parallel_size * world_size))
