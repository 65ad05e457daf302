"""EngineCore: the scheduler driving an Executor, one step at a time, and recovering.

A step that fails never leaves its uncomputed blocks in the prefix cache, and its requests
are recovered or failed clearly:
- WorkerCrashedError (a worker died, hung past execute_model_timeout_s, or lost a peer):
  restart the workers, drop the prefix cache, put every running and in-flight request back
  as preempted with the tokens it produced (recomputed from prompt plus output), go on;
  bounded by max_worker_restarts per RESTART_WINDOW_S, after which the engine dies cleanly;
- out of memory (E001): put the step's requests back, halve the token budget and
  max_num_seqs (never below one max_model_len sequence), and grow them back after
  GROW_AFTER_STEPS good steps; a request that fails even alone finishes with "error";
- anything else: put the step's requests back and raise (the caller sees the error; the
  engine stays consistent).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections import deque
from concurrent.futures import Future
from typing import Any

import torch

from fleetllm.config import RESTART_WINDOW_S, EngineConfig
from fleetllm.distributed.reconfigure import (
    SHARED_CORES_ENV,
    ReconfigureDistributedRequest,
    ReconfigureRankType,
    threads_per_rank,
)
from fleetllm.engine.messages import EngineCoreRequest
from fleetllm.engine.protocol import EngineClientInterface
from fleetllm.engine.restart import RestartBudget
from fleetllm.errors import (
    ConfigurationError,
    EngineDeadError,
    OutOfMemoryError,
    WorkerCrashedError,
)
from fleetllm.executor.abstract import Executor
from fleetllm.lora.request import LoRARequest
from fleetllm.sched.kv_transfer import make_kv_transfer
from fleetllm.sched.output import EngineCoreOutput, KVCacheConfig
from fleetllm.sched.request import Request, RequestStatus
from fleetllm.sched.scheduler import Scheduler
from fleetllm.structured.manager import StructuredOutputManager

logger = logging.getLogger(__name__)

GROW_AFTER_STEPS = 100  # good steps after an out-of-memory step before the limits grow
OOM_ERRORS = (OutOfMemoryError, MemoryError, torch.OutOfMemoryError)


class EngineCore(EngineClientInterface):
    """The scheduler and the executor's step loop; implements every declared engine method
    (engine/protocol.py)."""

    def __init__(self, config: EngineConfig, executor_class: type[Executor] | None = None) -> None:
        start = time.perf_counter()
        executor_class = executor_class or Executor.get_class(config)
        kv_transfer = make_kv_transfer(config)  # checked before any worker starts
        self.executor = executor_class(config)
        try:
            num_blocks = self._initialize_kv_caches(config)
        except BaseException:
            self.executor.shutdown()
            raise
        self.config = config.replace(
            cache_config=dataclasses.replace(config.cache_config, num_gpu_blocks=num_blocks))
        # Grammars load lazily: building the manager costs nothing until a structured request.
        self.scheduler = Scheduler(config.scheduler_config, num_blocks,
                                   config.cache_config.block_size,
                                   StructuredOutputManager(self.config),
                                   self._num_speculative_tokens(config),
                                   max_loras=config.lora_config and config.lora_config.max_loras,
                                   kv_transfer=kv_transfer)
        self.lora_requests: dict[int, LoRARequest] = {}  # the adapters add_lora accepted
        self.pinned_loras: set[int] = set()
        batches = self.executor.max_concurrent_batches
        self.batch_queue: deque[tuple[Future[Any], Any]] | None = (
            deque(maxlen=batches) if batches > 1 else None)
        self.restarts = RestartBudget(config.parallel_config.max_worker_restarts)
        self.num_worker_restarts = 0
        self.num_requests_recomputed = 0
        self.dead_reason: str | None = None
        self._good_steps = 0  # since the limits were last lowered or raised
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
        logger.info("KV cache: %d blocks of %d tokens (%d tokens, %.1f MiB per worker), sized "
                    "by %s; maximum concurrency for %d-token requests: %.2fx", num_blocks, bs,
                    usable, num_blocks * page / 2**20, self.executor.kv_cache_size_reason,
                    max_len, usable / max_len)
        return num_blocks

    def add_request(self, request: EngineCoreRequest) -> None:
        self.check_accepting()
        lora = request.lora_request
        if lora is not None and self.lora_requests.get(lora.lora_int_id) != lora:
            self.add_lora(lora)  # a bad adapter fails this request alone, before it queues
        self.scheduler.add_request(Request(
            request.request_id, request.prompt_token_ids, request.sampling_params,
            tuple(request.eos_token_ids), request.cache_salt, request.output_token_ids,
            lora))

    def check_accepting(self) -> None:
        """Raises, before anything is queued, if a request could not run now."""
        if self.dead_reason is not None:
            raise EngineDeadError(f"the engine is dead ({self.dead_reason}); create a new one")
        if self.executor.is_sleeping:
            raise RuntimeError(
                f"the engine is sleeping ({', '.join(sorted(self.executor.sleeping_tags))} "
                "released); call wake_up() before adding requests")

    def abort_requests(self, request_ids: list[str]) -> None:
        self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or bool(self.batch_queue)

    def step(self) -> list[EngineCoreOutput]:
        if self.dead_reason is not None:
            raise EngineDeadError(f"the engine is dead ({self.dead_reason}); create a new one")
        try:
            if self.batch_queue is not None:
                outputs = self.step_with_batch_queue()
            elif not self.scheduler.has_unfinished_requests():
                return []
            else:
                sched_out = self.scheduler.schedule()
                runner_out = self.executor.execute_model(sched_out)
                outputs = self.scheduler.update_from_output(sched_out, runner_out)
                if self.config.speculative_config is not None:
                    self._take_drafts()
        except WorkerCrashedError as e:
            self._restart_workers(e)
            return []
        except OOM_ERRORS as e:
            return self._shrink_after_oom(e)
        except BaseException:
            self._abandon_steps()
            raise
        self._good_steps += 1
        if self._good_steps >= GROW_AFTER_STEPS and self.scheduler.grow_limits():
            self._good_steps = 0
            logger.info("raised the limits to %d batched tokens, %d sequences",
                        self.scheduler.max_num_batched_tokens, self.scheduler.max_num_seqs)
        return outputs

    @staticmethod
    def _num_speculative_tokens(config: EngineConfig) -> int:
        spec = config.speculative_config
        return spec.num_speculative_tokens if spec is not None else 0

    def _take_drafts(self) -> None:
        """The workers proposed drafts after sampling; the next schedule() verifies them."""
        drafts = self.executor.take_draft_token_ids()
        if drafts is not None:
            self.scheduler.update_draft_token_ids(drafts)

    # ---- recovery -----------------------------------------------------------------------
    def _abandon_steps(self, kv_lost: bool = False) -> list[str]:
        """Puts the requests of every step in flight back (see Scheduler); the steps still
        queued are waited out, so their late replies cannot land in a later step."""
        queue = list(self.batch_queue or ())
        if self.batch_queue is not None:
            self.batch_queue.clear()
        if not kv_lost:
            for future, _ in queue:
                try:
                    future.result(self.config.parallel_config.execute_model_timeout_s)
                except BaseException:  # noqa: BLE001 - that step is abandoned either way
                    pass
        return self.scheduler.abandon_in_flight(kv_lost)

    def _restart_workers(self, error: WorkerCrashedError) -> None:
        if not self.executor.can_restart or not self.restarts.take(0):
            limit = self.config.parallel_config.max_worker_restarts
            why = (f"the {type(self.executor).__name__} cannot restart workers"
                   if not self.executor.can_restart else
                   f"{limit} worker restarts within {RESTART_WINDOW_S:.0f} s are spent "
                   "(max_worker_restarts)")
            self._die(f"{error}; {why}", error)
        start = time.perf_counter()
        recovered = self._abandon_steps(kv_lost=True)
        logger.warning("%s; restarting the workers and recomputing %d requests", error,
                       len(recovered))
        try:
            num_blocks = self.executor.restart_failed_workers()
        except BaseException as e:
            self._die(f"restarting the workers after ({error}) failed: {e}", e)
        self.scheduler.set_num_blocks(num_blocks)
        self._repin_loras()
        self.num_worker_restarts += 1
        self.num_requests_recomputed += len(recovered)
        logger.warning("workers restarted in %.2f s; %d requests resume",
                       time.perf_counter() - start, len(recovered))

    def _die(self, reason: str, cause: BaseException) -> None:
        """Gives up: every worker ends now, and every later call raises EngineDeadError."""
        self.dead_reason = reason
        try:
            self.executor.shutdown()
        except Exception:
            logger.exception("shutting down the failed executor failed")
        raise EngineDeadError(f"the engine is dead: {reason}") from cause

    def _shrink_after_oom(self, error: BaseException) -> list[EngineCoreOutput]:
        sched = self.scheduler
        step_reqs = self._abandon_steps()
        self._good_steps = 0
        if sched.shrink_limits():
            logger.warning("out of memory in a step of %d requests (%s); retrying with at most "
                           "%d batched tokens and %d sequences", len(step_reqs), error,
                           sched.max_num_batched_tokens, sched.max_num_seqs)
            return []
        if len(step_reqs) != 1:  # at the floor, but not alone yet: the retry runs one
            return []
        req = sched.requests[step_reqs[0]]
        message = (f"[E001] request {req.request_id} ({req.num_tokens} tokens) does not fit in "
                   f"memory even alone ({error}); shorten it or lower max_model_len "
                   f"(now {sched.config.max_model_len}), or give the engine more memory")
        logger.error("%s", message)
        out = sched.fail_request(req.request_id, message)
        return [out] if out is not None else []

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

    def reinitialize_distributed(self, new_data_parallel_size: int,
                                 new_data_parallel_rank: int = -1) -> None:
        if new_data_parallel_size < 1:
            raise ValueError(f"new_data_parallel_size={new_data_parallel_size} must be >= 1")
        shutdown = new_data_parallel_rank == ReconfigureRankType.SHUTDOWN_CURRENT_RANK
        if shutdown and self.scheduler.has_unfinished_requests():
            raise RuntimeError("cannot shut this engine down with requests in flight; move "
                               "or finish them first")
        pc = self.config.parallel_config
        threads = None
        if os.environ.get(SHARED_CORES_ENV) and self.config.device_config.device == "cpu":
            threads = threads_per_rank(new_data_parallel_size, pc.world_size)
            os.environ["OMP_NUM_THREADS"] = str(threads)  # for workers started after this
        self.executor.reinitialize_distributed(ReconfigureDistributedRequest(
            new_data_parallel_size, new_data_parallel_rank, num_threads=threads))
        if shutdown:
            self.dead_reason = "shut down by a scale-down (reinitialize_distributed)"

    def stats(self) -> dict[str, float]:
        return {**self.scheduler.stats(), "num_worker_restarts": self.num_worker_restarts,
                "num_requests_recomputed": self.num_requests_recomputed}

    def shutdown(self) -> None:
        self.executor.shutdown()

    # ---- LoRA adapters --------------------------------------------------------------------
    def add_lora(self, lora_request: LoRARequest) -> bool:
        """Loads and checks the adapter on every worker; False if it was loaded already. A
        bad adapter raises LoRAAdapterError naming the file, field or tensor; the engine
        goes on. Workers read an evicted adapter again from lora_path when a step needs it."""
        self._require_lora()
        lora_id = lora_request.lora_int_id
        known = self.lora_requests.get(lora_id)
        if known is not None and known != lora_request:
            raise ValueError(
                f"lora_int_id {lora_id} is already adapter {known.lora_name!r} "
                f"({known.lora_path}); remove_lora({lora_id}) first or choose another id")
        added = self.executor.add_lora(lora_request)
        self.lora_requests[lora_id] = lora_request
        return added

    def remove_lora(self, lora_id: int) -> bool:
        """Forgets the adapter; requests already running with it still finish."""
        self._require_lora()
        self.lora_requests.pop(lora_id, None)
        self.pinned_loras.discard(lora_id)
        return self.executor.remove_lora(lora_id)

    def pin_lora(self, lora_id: int) -> bool:
        """Keeps the adapter in the workers' host memory: never evicted for another."""
        self._require_lora()
        pinned = self.executor.pin_lora(lora_id)
        self.pinned_loras.add(lora_id)
        return pinned

    def get_lora_requests(self) -> list[LoRARequest]:
        return list(self.lora_requests.values())

    def lora_load(self) -> dict[str, list[int]]:
        load: dict[str, list[int]] = {}
        for column, requests in enumerate((self.scheduler.running, self.scheduler.waiting)):
            for req in requests:
                if req.lora_request is not None:
                    load.setdefault(req.lora_request.lora_name, [0, 0])[column] += 1
        return load

    def list_loras(self) -> set[int]:
        """The ids of the adapters in the workers' host memory."""
        self._require_lora()
        return self.executor.list_loras()

    def _repin_loras(self) -> None:
        """Restarted workers start with no adapters; the others load again on demand."""
        for lora_id in sorted(self.pinned_loras):
            try:
                self.executor.add_lora(self.lora_requests[lora_id])
                self.executor.pin_lora(lora_id)
            except Exception as e:  # noqa: BLE001 - serving goes on; the adapter is unpinned
                logger.warning("could not pin LoRA adapter %d again after the restart: %s",
                               lora_id, e)
                self.pinned_loras.discard(lora_id)

    def _require_lora(self) -> None:
        if self.config.lora_config is None:
            raise ConfigurationError("LoRA is not enabled in this engine; create it with "
                                     "enable_lora=True (--enable-lora)")
