"""The Executor: the only way the engine reaches workers (the reference's whole surface)."""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from functools import cached_property
from typing import Any

import numpy as np

from fleetllm.config import EngineConfig
from fleetllm.distributed.kv_transfer.aggregator import KVOutputAggregator
from fleetllm.distributed.reconfigure import ReconfigureDistributedRequest, ReconfigureRankType
from fleetllm.errors import ConfigurationError, WorkerCrashedError
from fleetllm.executor.calls import CallTable, FailureCallback
from fleetllm.executor.futures import FutureWrapper
from fleetllm.lora.request import LoRARequest
from fleetllm.sched.output import (
    DraftTokenIds,
    KVCacheConfig,
    KVCacheSpec,
    ModelRunnerOutput,
    SchedulerOutput,
)
from fleetllm.worker.worker_base import resolve_obj_by_qualname

logger = logging.getLogger(__name__)



class ExecutionMetrics:
    """execute_model latencies (the last 10,000 calls) and the tokens they processed."""

    def __init__(self, window: int = 10_000) -> None:
        self.latencies_s: deque[float] = deque(maxlen=window)
        self.total_tokens = 0
        self.total_seconds = 0.0

    def record(self, start: float, tokens: int) -> None:
        elapsed = time.perf_counter() - start
        self.latencies_s.append(elapsed)
        self.total_tokens += tokens
        self.total_seconds += elapsed

    def latency(self) -> dict[str, float]:
        if not self.latencies_s:
            return {"count": 0}
        ms = np.asarray(self.latencies_s) * 1e3
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        return {"count": len(ms), "mean_ms": float(ms.mean()), "p50_ms": float(p50),
                "p90_ms": float(p90), "p99_ms": float(p99), "max_ms": float(ms.max())}

    def throughput(self) -> dict[str, float]:
        busy = self.total_seconds
        return {"tokens": self.total_tokens, "busy_seconds": busy,
                "tokens_per_s": self.total_tokens / busy if busy else 0.0}
BACKENDS = ("uni", "mp", "ray", "external_launcher")
# The default KV cache's room beyond max_num_seqs full sequences, kept for cached prefixes.
PREFIX_CACHE_SHARE = 0.25


def _check_lora_id(lora_id: int) -> None:
    if not isinstance(lora_id, int) or isinstance(lora_id, bool) or lora_id < 1:
        raise ValueError(f"lora_id={lora_id!r} must be an integer >= 1 (0 is the base model)")


class Executor(ABC):
    uses_ray: bool = False
    supports_pp: bool = False
    # Whether restart_failed_workers() can replace the workers (they live in other
    # processes); such executors also bound each step by execute_model_timeout_s.
    can_restart: bool = False
    table: CallTable | None = None  # the multi-worker executors' one call table

    @staticmethod
    def get_class(config: EngineConfig) -> type[Executor]:
        backend = config.parallel_config.distributed_executor_backend
        if isinstance(backend, type):
            cls = backend
        elif backend == "uni":
            from fleetllm.executor.uniproc import UniProcExecutor

            cls = UniProcExecutor
        elif backend == "external_launcher":
            from fleetllm.executor.uniproc import ExecutorWithExternalLauncher

            cls = ExecutorWithExternalLauncher
        elif backend == "mp":
            from fleetllm.executor.multiproc import MultiprocExecutor

            cls = MultiprocExecutor
        elif backend == "ray":
            from fleetllm.executor.ray import RayDistributedExecutor

            cls = RayDistributedExecutor
        elif isinstance(backend, str) and "." in backend:
            cls = resolve_obj_by_qualname(backend)
        else:
            raise ConfigurationError(
                f"unknown distributed_executor_backend {backend!r}; choose one of "
                f"{', '.join(BACKENDS)}, an Executor subclass, or a 'package.module.Class' name"
            )
        if not (isinstance(cls, type) and issubclass(cls, Executor)):
            raise TypeError(f"distributed_executor_backend must be an Executor subclass, got {cls}")
        return cls

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.model_config = config.model_config
        self.cache_config = config.cache_config
        self.parallel_config = config.parallel_config
        self.scheduler_config = config.scheduler_config
        self.load_config = config.load_config
        self.device_config = config.device_config
        self.is_sleeping = False
        self.sleeping_tags: set[str] = set()
        self.metrics = ExecutionMetrics()
        self.kv_cache_configs: list[KVCacheConfig] = []
        self.kv_cache_size_reason = ""  # why the KV cache has the size it has
        self.num_restarts = 0
        # With a KV connector, every rank's finished transfers are counted (mp, ray).
        self.kv_output_aggregator: KVOutputAggregator | None = None
        self._init_executor()
        if config.kv_transfer_config is not None and self.parallel_config.world_size > 1:
            self.init_kv_output_aggregator(None)

    @abstractmethod
    def _init_executor(self) -> None: ...

    @abstractmethod
    def collective_rpc(self, method: str | Callable[..., Any], timeout: float | None = None,
                       args: tuple = (), kwargs: dict[str, Any] | None = None,
                       non_block: bool = False, return_exceptions: bool = False) -> list[Any]:
        """Runs method (a worker method name, or a callable taking the worker first) on every
        worker; one result per worker, or Futures with non_block. A timeout raises
        CommunicationTimeoutError; return_exceptions puts a failed worker's exception in its
        slot instead of raising."""

    @abstractmethod
    def check_health(self) -> None: ...

    def initialize_from_config(self, kv_cache_configs: list[KVCacheConfig]) -> None:
        self.collective_rpc("initialize_from_config", args=(kv_cache_configs[0],))
        self.collective_rpc("compile_or_warm_up_model")
        self.kv_cache_configs = list(kv_cache_configs)

    def determine_num_blocks(self) -> tuple[int, list[str], int]:
        """(KV blocks every worker can hold, layer names, the largest page size in bytes).

        Unless kv_cache_memory_bytes is set, the cache is also no larger than max_num_seqs
        sequences of max_model_len tokens can fill, plus PREFIX_CACHE_SHARE for cached
        prefixes no running request holds: a 6M-parameter model needs no 4 GB cache."""
        specs = self.get_kv_cache_specs()
        available = self.determine_available_memory()
        page = [sum(s.page_size_bytes for s in spec.values()) for spec in specs]
        num_blocks = min(mem // p for mem, p in zip(available, page))
        if self.cache_config.kv_cache_memory_bytes is None:
            sc = self.scheduler_config
            per_seq = -(-sc.max_model_len // self.cache_config.block_size)
            useful = int(sc.max_num_seqs * per_seq * (1 + PREFIX_CACHE_SHARE)) + 1
            reason = (f"what {sc.max_num_seqs} sequences (max_num_seqs) of {sc.max_model_len} "
                      f"tokens (max_model_len) can use, plus {PREFIX_CACHE_SHARE:.0%} for the "
                      "prefix cache")
            if useful >= num_blocks:
                reason = f"the memory available ({min(available) / 2**30:.2f} GiB per worker)"
            self.kv_cache_size_reason = reason
            num_blocks = min(num_blocks, useful)
        else:
            self.kv_cache_size_reason = "kv_cache_memory_bytes"
        return num_blocks, sorted({name for spec in specs for name in spec}), max(page)

    def register_failure_callback(self, callback: FailureCallback) -> None:
        """Called once each time the executor fails (a worker died, hung, or lost a peer);
        restart_failed_workers() re-arms it for the next failure. Executors without a call
        table (uni, external_launcher) never fail this way."""
        if self.table is not None:
            self.table.register_failure_callback(callback)

    def restart_failed_workers(self) -> int:
        """Stops what is left of the worker group, starts fresh workers with a new
        rendezvous (tensor- and pipeline-parallel groups rebuilt), loads the weights, and
        rebuilds the KV cache; returns its number of blocks (never more than before, so
        the scheduler's block ids stay valid)."""
        if not self.can_restart:
            raise WorkerCrashedError(
                f"the {type(self).__name__} runs its worker in this process and cannot "
                "restart it; use distributed_executor_backend='mp' or 'ray' for recovery")
        if not self.kv_cache_configs:
            raise RuntimeError("restart_failed_workers() before the KV cache was initialized")
        start = time.perf_counter()
        self._replace_workers()
        fits, names, _ = self.determine_num_blocks()
        num_blocks = min(fits, self.kv_cache_configs[0].num_blocks)
        self.initialize_from_config([KVCacheConfig(num_blocks, names)
                                     for _ in self.kv_cache_configs])
        self.is_sleeping, self.sleeping_tags = False, set()
        if self.kv_output_aggregator is not None:  # the old group's reports died with it
            self.init_kv_output_aggregator(self.kv_output_aggregator.expected_finished_count)
        self.num_restarts += 1
        logger.warning("restarted %d workers in %.2f s (%d KV blocks)",
                       self.parallel_config.world_size, time.perf_counter() - start, num_blocks)
        return num_blocks

    def _replace_workers(self) -> None:
        """Ends the current worker group and starts a new one (workers loaded, no KV)."""
        raise NotImplementedError

    def determine_available_memory(self) -> list[int]:
        return self.collective_rpc("determine_available_memory")

    def get_kv_cache_specs(self) -> list[dict[str, KVCacheSpec]]:
        return self.collective_rpc("get_kv_cache_spec")

    # The rank whose execute_model answer is used; only it replies (None: every rank).
    execute_model_reply_rank: int | None = None

    @property
    def output_rank(self) -> int:
        """The rank that samples: the first tensor rank of the last pipeline stage."""
        return self.parallel_config.world_size - self.parallel_config.tensor_parallel_size

    def init_kv_output_aggregator(self, finished_count: int | None) -> None:
        self.kv_output_aggregator = KVOutputAggregator(
            finished_count or self.parallel_config.world_size)

    def execute_model(self, scheduler_output: SchedulerOutput,
                      non_block: bool = False) -> ModelRunnerOutput | Future[ModelRunnerOutput]:
        start = time.perf_counter()
        aggregator = self.kv_output_aggregator
        # A connector's transfers finish on every rank: then every rank replies.
        reply = self.execute_model_reply_rank if aggregator is None else None
        extra: dict[str, Any] = {} if reply is None else {"unique_reply_rank": reply}
        if self.can_restart:  # a step that overruns counts as hung workers: a crash
            extra["hang_timeout"] = self.parallel_config.execute_model_timeout_s
        results = self.collective_rpc("execute_model", args=(scheduler_output,),
                                      non_block=non_block, **extra)
        if aggregator is None:
            result = results[0]
        elif non_block:
            result = FutureWrapper(results, aggregator, self.output_rank)
        else:
            result = aggregator.aggregate(results, self.output_rank)
        tokens = scheduler_output.total_num_scheduled_tokens
        if non_block:
            result.add_done_callback(lambda _: self.metrics.record(start, tokens))
        else:
            self.metrics.record(start, tokens)
        return result

    def get_performance_metrics(self) -> dict[str, Any]:
        """execute_model latency percentiles, tokens/s, and each worker's memory."""
        usage = self.collective_rpc("get_memory_usage", timeout=10, return_exceptions=True)
        return {
            "latency": self.metrics.latency(),
            "throughput": self.metrics.throughput(),
            "resource_utilization": [
                u if isinstance(u, dict) else {"error": repr(u)} for u in usage
            ],
        }

    def execute_dummy_batch(self) -> None:
        self.collective_rpc("execute_dummy_batch")

    def take_draft_token_ids(self) -> DraftTokenIds | None:
        """The output rank's drafts for the next step (the other ranks answer None)."""
        output: list[DraftTokenIds | None] = self.collective_rpc("take_draft_token_ids")
        return output[self.output_rank]

    def reinitialize_distributed(self, reconfig_request: ReconfigureDistributedRequest) -> None:
        """Elastic data parallel: every worker learns the new fleet (and its thread count);
        a rank told SHUTDOWN_CURRENT_RANK then ends its workers."""
        self.collective_rpc("reinitialize_distributed", args=(reconfig_request,))
        if reconfig_request.new_data_parallel_rank == ReconfigureRankType.SHUTDOWN_CURRENT_RANK:
            self.shutdown()

    @property
    def max_concurrent_batches(self) -> int:
        return 1

    def profile(self, is_start: bool = True) -> None:
        self.collective_rpc("profile", args=(is_start,))

    def start_profile(self) -> None:
        self.collective_rpc("start_profile")

    def stop_profile(self) -> None:
        self.collective_rpc("stop_profile")

    def save_sharded_state(self, path: str, pattern: str | None = None,
                           max_size: int | None = None) -> None:
        self.collective_rpc("save_sharded_state",
                            kwargs={"path": path, "pattern": pattern, "max_size": max_size})

    # ---- LoRA adapters: every worker loads, drops or pins its shard of the adapter -------
    def add_lora(self, lora_request: LoRARequest) -> bool:
        _check_lora_id(lora_request.lora_int_id)
        return all(self.collective_rpc("add_lora", args=(lora_request,)))

    def remove_lora(self, lora_id: int) -> bool:
        _check_lora_id(lora_id)
        return all(self.collective_rpc("remove_lora", args=(lora_id,)))

    def pin_lora(self, lora_id: int) -> bool:
        _check_lora_id(lora_id)
        return all(self.collective_rpc("pin_lora", args=(lora_id,)))

    def list_loras(self) -> set[int]:
        sets: list[set[int]] = self.collective_rpc("list_loras")
        if any(s != sets[0] for s in sets):
            raise RuntimeError(f"the workers hold different LoRA adapters: {sets}")
        return sets[0]

    @cached_property
    def supported_tasks(self) -> tuple[str, ...]:
        return self.collective_rpc("get_supported_tasks")[0]

    def shutdown(self) -> None:
        self.collective_rpc("shutdown")

    def sleep(self, level: int = 1) -> None:
        if self.is_sleeping:
            logger.warning("executor is already sleeping")
            return
        start = time.perf_counter()
        self.collective_rpc("sleep", kwargs={"level": level})
        self.sleeping_tags = {"weights", "kv_cache"}
        self.is_sleeping = True
        logger.info("fell asleep in %.3f s", time.perf_counter() - start)

    def wake_up(self, tags: list[str] | None = None) -> None:
        if not self.is_sleeping:
            logger.warning("executor is not sleeping")
            return
        for tag in tags or []:
            if tag not in self.sleeping_tags:
                logger.warning("tag %s is not in sleeping tags %s", tag, self.sleeping_tags)
                return
        start = time.perf_counter()
        self.collective_rpc("wake_up", kwargs={"tags": tags})
        logger.info("woke up %s in %.3f s", tags or sorted(self.sleeping_tags),
                    time.perf_counter() - start)
        self.sleeping_tags = set() if not tags else self.sleeping_tags - set(tags)
        self.is_sleeping = bool(self.sleeping_tags)


class WorkerGroupExecutor(Executor):
    """The executors whose workers live in other processes (mp, Ray): every call goes
    through the one call table, and the worker group can be restarted."""

    supports_pp = True
    can_restart = True

    @property
    def execute_model_reply_rank(self) -> int:
        return self.output_rank

    def _before_call(self) -> None:
        """A backend's own check before each call (Ray: that its session still exists)."""

    def collective_rpc(self, method: str | Callable[..., Any], timeout: float | None = None,
                       args: tuple = (), kwargs: dict[str, Any] | None = None,
                       non_block: bool = False, return_exceptions: bool = False,
                       unique_reply_rank: int | None = None,
                       hang_timeout: float | None = None) -> list[Any]:
        self._before_call()
        return self.table.collective_rpc(method, timeout, args, kwargs, non_block,
                                         return_exceptions, unique_reply_rank, hang_timeout)

