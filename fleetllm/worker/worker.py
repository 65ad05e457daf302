"""The Worker: one rank on a CPU or CUDA device."""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import traceback
from pathlib import Path
from typing import Any

import psutil
import torch

from fleetllm.config import DEFAULT_KV_CACHE_RAM_FRACTION, EngineConfig
from fleetllm.distributed.parallel_state import ParallelContext, init_distributed
from fleetllm.errors import ConfigurationError, OutOfMemoryError
from fleetllm.lora.manager import LoRAManager
from fleetllm.lora.request import LoRARequest
from fleetllm.model.layers.linear import drop_packed_weights, weight_bytes_held, weights_as_held
from fleetllm.model.loader import SHARDED_STATE_PATTERN
from fleetllm.sched.output import (
    DraftTokenIds,
    KVCacheConfig,
    KVCacheSpec,
    ModelRunnerOutput,
    SchedulerOutput,
)
from fleetllm.worker.kv_connector import attach_kv_connector, execute_with_connector
from fleetllm.worker.model_runner import ModelRunner
from fleetllm.worker.worker_base import WorkerBase

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def tune_cpu_allocator() -> None:
    """Keeps freed activations in the heap instead of returning them to the OS.

    With glibc's defaults every tensor over a few MB is mmap-ed and unmapped per use, so each
    op pays page faults on its output (prefill ran ~1.5x slower). Served from the heap and
    not trimmed, the memory is reused. Only affects glibc; elsewhere nothing changes.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 32 * 2**20)
        libc.mallopt(_M_TRIM_THRESHOLD, 2**30)
    except (OSError, AttributeError):
        logger.debug("glibc not found; allocator left as it is")


def release_cpu_heap() -> None:
    """Hands the heap's free pages back to the OS.

    tune_cpu_allocator keeps freed memory in the heap for the next step, so without this a
    worker that dropped its weights (sleep level 2) or its model (shutdown) would keep its
    RSS. Only affects glibc; elsewhere nothing changes.
    """
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        logger.debug("glibc not found; freed memory stays with the allocator")


class Worker(WorkerBase):
    def __init__(self, config: EngineConfig, local_rank: int = 0, rank: int = 0,
                 distributed_init_method: str | None = None, is_driver_worker: bool = True) -> None:
        super().__init__(config, local_rank, rank, distributed_init_method, is_driver_worker)
        self.pc = ParallelContext()
        self.device = torch.device("cpu")
        self.model_runner: ModelRunner | None = None
        self.kv_cache_config: KVCacheConfig | None = None
        self.profiler: Any = None

    def init_device(self) -> None:
        if self.config.device_config.device == "cuda":
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
        else:
            self._init_cpu()
        pcfg = self.config.parallel_config
        if pcfg.world_size > 1:
            self.pc = init_distributed(self.rank, pcfg.tensor_parallel_size,
                                       pcfg.pipeline_parallel_size,
                                       self.distributed_init_method, self.device,
                                       layer_partition=pcfg.pp_layer_partition)
        self.model_runner = ModelRunner(self.config, self.pc, self.device)

    def _init_cpu(self) -> None:
        tune_cpu_allocator()
        if "OMP_NUM_THREADS" not in os.environ:  # an explicit setting wins
            world = self.config.parallel_config.world_size
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
                os.cpu_count() or 1)
            torch.set_num_threads(max(1, cores // world))

    def load_model(self) -> None:
        self.model_runner.load_model()

    def determine_available_memory(self) -> int:
        """Bytes this worker can give to the KV cache."""
        requested = self.config.cache_config.kv_cache_memory_bytes
        if requested is not None:
            return requested
        world = self.config.parallel_config.world_size
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(free * 0.9)
        return int(psutil.virtual_memory().available * DEFAULT_KV_CACHE_RAM_FRACTION / world)

    def get_kv_cache_spec(self) -> dict[str, KVCacheSpec]:
        return self.model_runner.get_kv_cache_spec()

    def initialize_from_config(self, kv_cache_config: KVCacheConfig) -> None:
        self.kv_cache_config = kv_cache_config
        try:
            self.model_runner.initialize_kv_cache(kv_cache_config)
        except (RuntimeError, OSError) as e:
            raise OutOfMemoryError(
                f"cannot allocate a KV cache of {kv_cache_config.num_blocks} blocks: {e}; "
                "lower kv_cache_memory_bytes"
            ) from e
        attach_kv_connector(self.model_runner, self.config, self.rank)

    def compile_or_warm_up_model(self) -> None:
        """One dummy forward so the first real step does not pay for kernel set-up."""
        self.execute_dummy_batch()

    def execute_dummy_batch(self) -> None:
        runner = self.model_runner
        if not runner.kv_caches:
            return
        from fleetllm.sampling_params import SamplingParams
        from fleetllm.sched.output import CachedRequestData, NewRequestData

        bs = self.config.cache_config.block_size
        n = min(bs, self.config.scheduler_config.max_model_len - 1)
        req = NewRequestData("__dummy__", [0] * n, n, SamplingParams(max_tokens=1), [1], 0, [])
        so = SchedulerOutput([req], CachedRequestData(), {"__dummy__": n}, n, [])
        runner.execute_model(so)
        runner.execute_model(SchedulerOutput.empty(["__dummy__"]))

    def take_draft_token_ids(self) -> DraftTokenIds | None:
        """The n-gram drafts proposed after the last step's sampling (output rank only)."""
        spec = self.model_runner.spec if self.model_runner is not None else None
        return spec.take_draft_token_ids() if spec is not None else None

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        try:
            conn = self.model_runner.kv_connector
            if conn is not None:
                return execute_with_connector(conn, scheduler_output,
                                              self.model_runner.execute_model)
            return self.model_runner.execute_model(scheduler_output)
        except (torch.OutOfMemoryError, MemoryError) as e:
            # Typed, so the engine can retry with a smaller batch (rpc rebuilds it as E001 on
            # the driver). The step's requests may be half-updated (tokens appended, computed
            # counts moved), so they are forgotten: a retry must send them whole again.
            for req_id in scheduler_output.num_scheduled_tokens:
                self.model_runner.requests.pop(req_id, None)
            self._release_failed_step(e)
            raise OutOfMemoryError(self._oom_message(scheduler_output, e)) from e

    def _release_failed_step(self, error: BaseException) -> None:
        # The traceback's frames still hold the step's activations; keep the lines, drop
        # the locals, and hand the cached blocks back so a retry finds the memory free.
        traceback.clear_frames(error.__traceback__)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _oom_message(self, so: SchedulerOutput, error: BaseException) -> str:
        sc = self.config.scheduler_config
        where = f"memory on {self.device}" if self.device.type == "cuda" else "host memory"
        return (f"worker rank {self.rank} ran out of {where} in a step of "
                f"{so.total_num_scheduled_tokens} tokens over {len(so.num_scheduled_tokens)} "
                f"sequences ({type(error).__name__}: {error}); lower max_num_batched_tokens "
                f"(now {sc.max_num_batched_tokens}), max_num_seqs (now {sc.max_num_seqs}) or "
                f"max_model_len (now {sc.max_model_len})")

    def profile(self, is_start: bool = True, trace_dir: str | None = None) -> None:
        if is_start:
            out = trace_dir or os.environ.get("FLEETLLM_TORCH_PROFILER_DIR", "./fleetllm_traces")
            Path(out).mkdir(parents=True, exist_ok=True)
            self.profiler = torch.profiler.profile(
                on_trace_ready=torch.profiler.tensorboard_trace_handler(out, f"rank{self.rank}"))
            self.profiler.start()
        elif self.profiler is not None:
            self.profiler.stop()
            self.profiler = None

    def start_profile(self) -> None:
        self.profile(True)

    def stop_profile(self) -> None:
        self.profile(False)

    def get_memory_usage(self) -> dict[str, Any]:
        runner = self.model_runner
        weights = weight_bytes_held(runner.model) if runner.model is not None else 0
        kv = sum(2 * k.numel() * k.element_size() for k, _ in runner.kv_caches.values())
        usage: dict[str, Any] = {
            "rank": self.rank, "device": str(self.device),
            "rss_bytes": psutil.Process().memory_info().rss,
            "weights_bytes": weights, "kv_cache_bytes": kv,
        }
        if self.device.type == "cuda":
            usage["cuda_allocated_bytes"] = torch.cuda.memory_allocated(self.device)
        return usage

    # ---- sleep mode -------------------------------------------------------------------
    def sleep(self, level: int = 1) -> None:
        """Level 1 frees the KV cache and moves weights to host memory (where they already
        are on CPU); level 2 also drops the weights, which wake_up reloads."""
        if level not in (1, 2):
            raise ValueError(f"sleep level must be 1 or 2, got {level}")
        runner = self.model_runner
        runner.release_kv_cache()
        if level == 2:
            drop_packed_weights(runner.model)
        params = list(runner.model.parameters())
        if level == 1 and self.device.type != "cpu":
            self._host_weights = [p.data.to("cpu") for p in params]
        for p in params:
            if level == 2 or self.device.type != "cpu":
                p.data = torch.empty(0, dtype=p.dtype, device=self.device)
        self._sleep_level = level
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        release_cpu_heap()

    def wake_up(self, tags: list[str] | None = None) -> None:
        tags = tags or ["weights", "kv_cache"]
        runner = self.model_runner
        if "weights" in tags:
            if getattr(self, "_sleep_level", 1) == 2:
                runner.load_model()
            elif getattr(self, "_host_weights", None) is not None:
                for p, host in zip(runner.model.parameters(), self._host_weights):
                    p.data = host.to(self.device)
                self._host_weights = None
        if "kv_cache" in tags and self.kv_cache_config is not None:
            runner.initialize_kv_cache(self.kv_cache_config)
            attach_kv_connector(runner, self.config, self.rank)

    def save_sharded_state(self, path: str, pattern: str | None = None,
                           max_size: int | None = None) -> None:
        """Writes this rank's parameters, as held, for load_format='sharded_state'."""
        from safetensors.torch import save_file

        pattern = pattern or SHARDED_STATE_PATTERN
        Path(path).mkdir(parents=True, exist_ok=True)
        part: dict[str, torch.Tensor] = {}
        size = index = 0
        for name, tensor in weights_as_held(self.model_runner.model):
            nbytes = tensor.numel() * tensor.element_size()
            if part and max_size is not None and size + nbytes > max_size:
                save_file(part, str(Path(path) / pattern.format(rank=self.rank, part=index)))
                part, size, index = {}, 0, index + 1
            part[name] = tensor.detach().contiguous().cpu()
            size += nbytes
        save_file(part, str(Path(path) / pattern.format(rank=self.rank, part=index)))

    # ---- LoRA adapters (the executor's add_lora, remove_lora, pin_lora, list_loras) -----
    def _lora(self) -> LoRAManager:
        lora = self.model_runner.lora
        if lora is None:
            raise ConfigurationError("LoRA is not enabled; create the engine with "
                                     "enable_lora=True (--enable-lora)")
        return lora

    def add_lora(self, lora_request: LoRARequest) -> bool:
        return self._lora().add(lora_request)

    def remove_lora(self, lora_id: int) -> bool:
        return self._lora().remove(lora_id)

    def pin_lora(self, lora_id: int) -> bool:
        return self._lora().pin(lora_id)

    def list_loras(self) -> set[int]:
        return self._lora().list()

    def check_health(self) -> None:
        return None

    def shutdown(self) -> None:
        if self.profiler is not None:
            self.profile(False)
        if self.model_runner is not None:
            if self.model_runner.kv_connector is not None:
                self.model_runner.kv_connector.shutdown()
                self.model_runner.kv_connector = None
            self.model_runner.release_kv_cache()
            self.model_runner.model = None
        gc.collect()
        release_cpu_heap()
