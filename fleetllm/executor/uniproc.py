"""UniProcExecutor: the single worker lives in this process."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from fleetllm.errors import CommunicationTimeoutError
from fleetllm.executor.abstract import Executor
from fleetllm.worker.worker_base import WorkerWrapperBase


class UniProcExecutor(Executor):
    def _init_executor(self) -> None:
        # Calls with a timeout run on this thread so the caller can stop waiting; a call that
        # overran keeps the worker busy, so later calls queue behind it instead of racing it.
        self._rpc_thread: ThreadPoolExecutor | None = None
        self._last: Future[Any] | None = None
        self.driver_worker = WorkerWrapperBase(rpc_rank=0)
        self.driver_worker.init_worker(self.config, local_rank=0, rank=0,
                                       distributed_init_method=None, is_driver_worker=True)
        self.collective_rpc("init_device")
        self.collective_rpc("load_model")

    def collective_rpc(self, method: str | Callable[..., Any], timeout: float | None = None,
                       args: tuple = (), kwargs: dict[str, Any] | None = None,
                       non_block: bool = False, return_exceptions: bool = False) -> list[Any]:
        kwargs = kwargs or {}
        run = self.driver_worker.execute_method
        if timeout is None and not non_block and (self._last is None or self._last.done()):
            try:
                return [run(method, *args, **kwargs)]
            except Exception as e:
                if return_exceptions:
                    return [e]
                raise
        if self._rpc_thread is None:
            self._rpc_thread = ThreadPoolExecutor(1, thread_name_prefix="fleetllm-uniproc")
        future = self._rpc_thread.submit(run, method, *args, **kwargs)
        self._last = future
        if non_block:
            return [future]
        try:
            return [future.result(timeout)]
        except FutureTimeout:
            name = getattr(method, "__name__", method)
            error = CommunicationTimeoutError(
                f"collective_rpc({name!r}) did not finish within {timeout} s; the worker "
                "finishes it in the background before serving the next call")
            if return_exceptions:
                return [error]
            raise error from None
        except Exception as e:
            if return_exceptions:
                return [e]
            raise

    def check_health(self) -> None:
        return None

    def shutdown(self) -> None:
        if self.driver_worker.worker is not None:
            self.collective_rpc("shutdown")
            self.driver_worker.worker = None
        if self._rpc_thread is not None:
            self._rpc_thread.shutdown(wait=True)
            self._rpc_thread = None
