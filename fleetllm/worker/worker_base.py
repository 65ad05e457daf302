"""WorkerBase (what every worker offers) and WorkerWrapperBase (builds one by qualname)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch

from fleetllm.config import EngineConfig
from fleetllm.distributed.reconfigure import ReconfigureDistributedRequest


def resolve_obj_by_qualname(qualname: str) -> Any:
    module_name, _, obj_name = qualname.rpartition(".")
    if not module_name:
        raise ValueError(f"{qualname!r} is not a 'package.module.Name' qualified name")
    try:
        return getattr(importlib.import_module(module_name), obj_name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot import {qualname!r}: {e}") from e


class WorkerBase:
    """One rank: owns a device, a slice of the model and its KV cache."""

    def __init__(self, config: EngineConfig, local_rank: int = 0, rank: int = 0,
                 distributed_init_method: str | None = None, is_driver_worker: bool = True) -> None:
        self.config = config
        self.local_rank = local_rank
        self.rank = rank
        self.distributed_init_method = distributed_init_method
        self.is_driver_worker = is_driver_worker

    def init_device(self) -> None:
        raise NotImplementedError

    def load_model(self) -> None:
        raise NotImplementedError

    def execute_model(self, scheduler_output: Any) -> Any:
        raise NotImplementedError

    def check_health(self) -> None:
        return None

    def shutdown(self) -> None:
        return None

    def get_supported_tasks(self) -> tuple[str, ...]:
        return ("generate",)

    def reinitialize_distributed(self, reconfig_request: ReconfigureDistributedRequest) -> None:
        """The fleet grew or shrank: this rank takes its new share of the CPU cores (the
        data-parallel engines exchange nothing, so there is no group to rebuild)."""
        if reconfig_request.num_threads is not None:
            torch.set_num_threads(reconfig_request.num_threads)

    def take_draft_token_ids(self) -> None:
        return None


class WorkerWrapperBase:
    """Creates the worker class named in the config and mixes in a worker extension class,
    whose methods then become callable through collective_rpc."""

    def __init__(self, rpc_rank: int = 0, worker_cls: str = "fleetllm.worker.worker.Worker",
                 worker_extension_cls: str | None = None) -> None:
        self.rpc_rank = rpc_rank
        self.worker_cls = worker_cls
        self.worker_extension_cls = worker_extension_cls
        self.worker: WorkerBase | None = None

    def init_worker(self, config: EngineConfig, **kwargs: Any) -> None:
        cls = resolve_obj_by_qualname(self.worker_cls)
        ext_name = self.worker_extension_cls or config.parallel_config.worker_extension_cls
        if ext_name:
            ext = resolve_obj_by_qualname(ext_name)
            # The extension comes first, so it may also wrap worker methods (super() calls).
            cls = type(cls.__name__, (ext, cls), {})
        self.worker = cls(config, **kwargs)

    def execute_method(self, method: str | Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        if callable(method):
            return method(self.worker, *args, **kwargs)
        target = self if method in ("init_worker",) else self.worker
        fn = getattr(target, method, None)
        if fn is None:
            raise AttributeError(
                f"worker {type(self.worker).__name__} has no method {method!r}"
            )
        return fn(*args, **kwargs)
