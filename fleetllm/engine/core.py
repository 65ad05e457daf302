"""EngineCore: the scheduler driving an Executor, one step at a time."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from concurrent.futures import Future
from typing import Any

from fleetllm.config import EngineConfig
from fleetllm.errors import ConfigurationError
from fleetllm.executor.abstract import Executor
from fleetllm.sched.output import EngineCoreOutput, KVCacheConfig
from fleetllm.sched.request import Request, RequestStatus
from fleetllm.sched.scheduler import Scheduler

logger = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, config: EngineConfig, executor_class: type[Executor] | None = None) -> None:
        start = time.perf_counter()
        executor_class = executor_class or Executor.get_class(config)
        self.executor = executor_class(config)
        try:
            num_blocks = self._initialize_kv_caches(config)
        except BaseException:
            self.executor.shutdown()
            raise
        self.config = config.replace(
            cache_config=dataclasses.replace(config.cache_config, num_gpu_blocks=num_blocks))
        self.scheduler = Scheduler(config.scheduler_config, num_blocks,
                                   config.cache_config.block_size)
        batches = self.executor.max_concurrent_batches
        self.batch_queue: deque[tuple[Future[Any], Any]] | None = (
            deque(maxlen=batches) if batches > 1 else None)
        self.startup_seconds = time.perf_counter() - start
        logger.info("engine ready in %.2f s", self.startup_seconds)

    def _initialize_kv_caches(self, config: EngineConfig) -> int:
        num_blocks, layer_names, page = self.executor.determine_num_blocks()
        bs = config.cache_config.block_size
        max_len = config.scheduler_config.max_model_len
        blocks_per_seq = -(-max_len // bs)
        if num_blocks - 1 < blocks_per_seq:
            need = (blocks_per_seq + 1) * page
            raise ConfigurationError(
                f"the KV cache holds {max(num_blocks - 1, 0)} blocks of {bs} tokens, fewer than "
                f"one sequence of max_model_len={max_len} needs ({blocks_per_seq}); raise "
                f"kv_cache_memory_bytes to at least {need} or lower max_model_len"
            )
        self.executor.initialize_from_config(
            [KVCacheConfig(num_blocks, layer_names)
             for _ in range(config.parallel_config.world_size)])
        usable = (num_blocks - 1) * bs
        logger.info("KV cache: %d blocks of %d tokens (%d tokens, %.1f MiB per worker); maximum "
                    "concurrency for %d-token requests: %.2fx", num_blocks, bs, usable,
                    num_blocks * page / 2**20, max_len, usable / max_len)
        return num_blocks

    def add_request(self, request: Request) -> None:
        self.scheduler.add_request(request)

    def abort_requests(self, request_ids: list[str]) -> None:
        self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or bool(self.batch_queue)

    def step(self) -> list[EngineCoreOutput]:
        if self.batch_queue is not None:
            return self.step_with_batch_queue()
        if not self.scheduler.has_unfinished_requests():
            return []
        sched_out = self.scheduler.schedule()
        runner_out = self.executor.execute_model(sched_out)
        return self.scheduler.update_from_output(sched_out, runner_out)

    def step_with_batch_queue(self) -> list[EngineCoreOutput]:
        """Keeps up to max_concurrent_batches steps in flight, so pipeline stages overlap:
        schedule while there is room, else wait for the oldest batch."""
        queue = self.batch_queue
        if len(queue) < queue.maxlen and self.scheduler.has_unfinished_requests():
            sched_out = self.scheduler.schedule()
            if sched_out.total_num_scheduled_tokens > 0:
                queue.append((self.executor.execute_model(sched_out, non_block=True), sched_out))
                if len(queue) < queue.maxlen:
                    return []
            else:
                self.scheduler.finished_req_ids[:0] = sched_out.finished_req_ids
        if not queue:
            return []
        future, sched_out = queue.popleft()
        return self.scheduler.update_from_output(sched_out, future.result())

    def collective_rpc(self, method: Any, timeout: float | None = None, args: tuple = (),
                       kwargs: dict[str, Any] | None = None) -> list[Any]:
        return self.executor.collective_rpc(method, timeout, args, kwargs)

    def reset_prefix_cache(self) -> bool:
        return self.scheduler.reset_prefix_cache()

    def sleep(self, level: int = 1) -> None:
        if self.scheduler.has_unfinished_requests():
            raise RuntimeError("cannot sleep with requests in flight; wait for them or abort them")
        self.scheduler.reset_prefix_cache()  # the cached blocks' contents are about to go
        self.executor.sleep(level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        self.executor.wake_up(tags)

    def is_sleeping(self) -> bool:
        return self.executor.is_sleeping

    def get_performance_metrics(self) -> dict[str, Any]:
        return self.executor.get_performance_metrics()

    def save_sharded_state(self, path: str, pattern: str | None = None,
                           max_size: int | None = None) -> None:
        self.executor.save_sharded_state(path, pattern, max_size)

    def stats(self) -> dict[str, float]:
        return self.scheduler.stats()

    def shutdown(self) -> None:
        self.executor.shutdown()
