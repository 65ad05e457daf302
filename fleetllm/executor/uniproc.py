"""UniProcExecutor: the single worker lives in this process."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import msgspec
import torch

from fleetllm.errors import CommunicationTimeoutError, ConfigurationError
from fleetllm.executor.abstract import Executor
from fleetllm.sched.output import ModelRunnerOutput, SchedulerOutput
from fleetllm.worker.worker_base import WorkerWrapperBase


def _timeout_error(name: object, timeout: float | None) -> CommunicationTimeoutError:
    return CommunicationTimeoutError(
        f"collective_rpc({name!r}) did not finish within {timeout} s; the worker finishes it "
        "in the background before serving the next call")


class _RpcFuture(Future):
    """The rpc thread's answer, as a non_block caller sees it on every backend: waiting past
    result(timeout) raises CommunicationTimeoutError (E003), as mp's and Ray's futures do, and
    with return_exceptions a failed call's exception is the result instead of being raised."""

    def __init__(self, inner: Future[Any], name: object, return_exceptions: bool) -> None:
        super().__init__()
        self._inner, self._name = inner, name
        self._return_exceptions = return_exceptions
        inner.add_done_callback(self._copy)

    def _copy(self, inner: Future[Any]) -> None:
        if inner.cancelled():
            super().cancel()
            self.set_running_or_notify_cancel()
            return
        error = inner.exception()
        if error is not None and not self._return_exceptions:
            self.set_exception(error)
        else:
            self.set_result(inner.result() if error is None else error)

    def cancel(self) -> bool:
        # Only a call still queued behind another can be cancelled; _copy then follows.
        return self._inner.cancel()

    def result(self, timeout: float | None = None) -> Any:
        try:
            return super().result(timeout)
        except FutureTimeout:
            raise _timeout_error(self._name, timeout) from None

    def exception(self, timeout: float | None = None) -> BaseException | None:
        try:
            return super().exception(timeout)
        except FutureTimeout:
            raise _timeout_error(self._name, timeout) from None


def _one_intra_op_thread() -> None:
    torch.set_num_threads(1)  # this thread's OpenMP setting only


class UniProcExecutor(Executor):
    """The worker runs on one thread, so that its torch work has one OpenMP team: libgomp
    stops spinning idle workers once it manages more threads than there are CPUs, and every
    op then waits for a sleeping worker to wake (a second team made batch-1 decode 1.6x
    slower on 2 cores).

    Without async scheduling that thread is the caller's. Calls with a timeout (or
    non_block) run on a side thread so the caller can stop waiting; that thread uses one
    intra-op thread, so it never starts a second team. A call that overran keeps the worker
    busy, so later calls queue behind it instead of racing it. With async scheduling the
    worker lives on its own thread from the start (start-up included), step N+1 is scheduled
    on the caller's while step N runs there, and every call goes through it."""

    def _init_rpc(self) -> None:
        self._rpc_thread: ThreadPoolExecutor | None = None
        self._last: Future[Any] | None = None
        self._always_thread = self.scheduler_config.async_scheduling

    def _init_executor(self) -> None:
        self._init_rpc()
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
        if (timeout is None and not non_block and not self._always_thread
                and (self._last is None or self._last.done())):
            try:
                return [run(method, *args, **kwargs)]
            except Exception as e:
                if return_exceptions:
                    return [e]
                raise
        if self._rpc_thread is None:
            self._rpc_thread = ThreadPoolExecutor(
                1, thread_name_prefix="fleetllm-uniproc",
                initializer=None if self._always_thread else _one_intra_op_thread)
        future = self._rpc_thread.submit(run, method, *args, **kwargs)
        self._last = future
        name = getattr(method, "__name__", method)
        if non_block:
            return [_RpcFuture(future, name, return_exceptions)]
        try:
            return [future.result(timeout)]
        except FutureTimeout:
            error = _timeout_error(name, timeout)
            if return_exceptions:
                return [error]
            raise error from None
        except Exception as e:
            if return_exceptions:
                return [e]
            raise

    def check_health(self) -> None:
        return None

    @property
    def max_concurrent_batches(self) -> int:
        """With async scheduling, step N+1 is scheduled while step N runs on the rpc thread."""
        return 2 if self.scheduler_config.async_scheduling else 1

    def shutdown(self) -> None:
        if self.driver_worker.worker is not None:
            self.collective_rpc("shutdown")
            self.driver_worker.worker = None
        if self._rpc_thread is not None:
            self._rpc_thread.shutdown(wait=True)
            self._rpc_thread = None


class ExecutorWithExternalLauncher(UniProcExecutor):
    """One worker per process of an external launcher such as torchrun.

    Each process runs its own engine; scheduling is deterministic, so every rank schedules
    the same steps. The ranks join one process group from the launcher's environment
    (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), and the output rank's result
    of each step is broadcast (msgspec bytes over the gloo group) so all ranks agree.
    """

    def _init_executor(self) -> None:
        missing = [v for v in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
                   if v not in os.environ]
        if missing:
            raise ConfigurationError(
                f"distributed_executor_backend='external_launcher' needs {', '.join(missing)} "
                "in the environment; start the script with torchrun")
        world = int(os.environ["WORLD_SIZE"])
        if world != self.parallel_config.world_size:
            raise ConfigurationError(
                f"torchrun started {world} processes but tensor_parallel_size x "
                f"pipeline_parallel_size = {self.parallel_config.world_size}; make them equal")
        self._init_rpc()
        self.rank = int(os.environ["RANK"])
        self.driver_worker = WorkerWrapperBase(rpc_rank=self.rank)
        self.driver_worker.init_worker(self.config, local_rank=int(os.environ["LOCAL_RANK"]),
                                       rank=self.rank, distributed_init_method="env://",
                                       is_driver_worker=self.rank == 0)
        self.collective_rpc("init_device")
        self.collective_rpc("load_model")

    def _cpu_group(self) -> Any:
        return self.driver_worker.worker.pc.cpu_group

    def determine_available_memory(self) -> list[int]:
        """The smallest across ranks, so every rank sizes the same KV cache."""
        import torch.distributed as dist

        mem = torch.tensor(super().determine_available_memory(), dtype=torch.int64)
        if self._cpu_group() is None:  # a single process: nothing to agree on
            return mem.tolist()
        dist.all_reduce(mem, op=dist.ReduceOp.MIN, group=self._cpu_group())
        return mem.tolist()

    def execute_model(self, scheduler_output: SchedulerOutput,
                      non_block: bool = False) -> Any:
        start = time.perf_counter()
        output = self.collective_rpc("execute_model", args=(scheduler_output,))[0]
        output = self._broadcast_output(output)
        self.metrics.record(start, scheduler_output.total_num_scheduled_tokens)
        if non_block:
            future: Future[Any] = Future()
            future.set_result(output)
            return future
        return output

    def _broadcast_output(self, output: ModelRunnerOutput) -> ModelRunnerOutput:
        import torch.distributed as dist

        group = self._cpu_group()
        if group is None:
            return output
        data = msgspec.msgpack.encode(output) if self.rank == self.output_rank else b""
        size = torch.tensor([len(data)], dtype=torch.int64)
        dist.broadcast(size, src=self.output_rank, group=group)
        buf = (torch.frombuffer(bytearray(data), dtype=torch.uint8) if data
               else torch.empty(int(size.item()), dtype=torch.uint8))
        dist.broadcast(buf, src=self.output_rank, group=group)
        return _OUTPUT_DECODER.decode(buf.numpy().tobytes())


_OUTPUT_DECODER = msgspec.msgpack.Decoder(ModelRunnerOutput)
