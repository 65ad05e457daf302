"""UniProcExecutor: the single worker lives in this process."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from fleetllm.executor.abstract import Executor
from fleetllm.worker.worker_base import WorkerWrapperBase


class UniProcExecutor(Executor):
    def _init_executor(self) -> None:
        self.driver_worker = WorkerWrapperBase(rpc_rank=0)
        self.driver_worker.init_worker(self.config, local_rank=0, rank=0,
                                       distributed_init_method=None, is_driver_worker=True)
        self.collective_rpc("init_device")
        self.collective_rpc("load_model")

    def collective_rpc(self, method: str | Callable[..., Any], timeout: float | None = None,
                       args: tuple = (), kwargs: dict[str, Any] | None = None,
                       non_block: bool = False) -> list[Any]:
        kwargs = kwargs or {}
        if not non_block:
            return [self.driver_worker.execute_method(method, *args, **kwargs)]
        future: Future[Any] = Future()
        try:
            future.set_result(self.driver_worker.execute_method(method, *args, **kwargs))
        except Exception as e:
            future.set_exception(e)
        return [future]

    def check_health(self) -> None:
        return None

    def shutdown(self) -> None:
        if self.driver_worker.worker is not None:
            self.collective_rpc("shutdown")
            self.driver_worker.worker = None
