"""MultiprocExecutor: one spawned process per rank.

Calls go out on one shared-memory broadcast ring (one writer, N readers); each worker
answers on its own ring. Every call carries an id, so a reply that arrives after its call
timed out is dropped instead of being taken for a later call's answer. A monitor thread
watches the worker processes: a death fails pending calls with WorkerCrashedError and fires
the failure callback once. Waiting happens in the caller's thread (no hand-off latency).
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import multiprocessing.connection
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from fleetllm.errors import CommunicationTimeoutError, WorkerCrashedError
from fleetllm.executor import rpc
from fleetllm.executor.abstract import Executor, FailureCallback
from fleetllm.executor.futures import CallFuture
from fleetllm.executor.shm_queue import MessageQueue, reclaim_orphan
from fleetllm.executor.worker_proc import SHUTDOWN, worker_main
from fleetllm.worker.worker_base import resolve_obj_by_qualname

logger = logging.getLogger(__name__)

WORKER_CLS = "fleetllm.worker.worker.Worker"
STARTUP_TIMEOUT_S = 300.0
_LINK_ERRORS = ("Connection reset", "Connection closed", "Broken pipe", "NCCL", "gloo")
SPIN_S = 2e-4
# The longest a waiting driver sleeps without a ring: the monitor rings on a crash, and a
# call's own deadline shortens it, so this only bounds a missed ring.
BELL_WAIT_S = 0.05


def get_open_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Call:
    __slots__ = ("call_id", "method", "expect", "results", "error")

    def __init__(self, call_id: int, method: Any, expect: list[int]) -> None:
        self.call_id = call_id
        self.method = method
        self.expect = expect  # ranks whose reply completes the call
        self.results: dict[int, Any] = {}
        self.error: BaseException | None = None

    def done(self) -> bool:
        return self.error is not None or len(self.results) == len(self.expect)


class MultiprocExecutor(Executor):
    supports_pp = True

    def _init_executor(self) -> None:
        self._closed = False
        self._failure: WorkerCrashedError | None = None
        self._failure_callbacks: list[FailureCallback] = []
        self._lock = threading.RLock()
        self._calls: dict[int, _Call] = {}
        self._waiters = 0  # threads in _resolve
        self._next_id = 0
        self.world_size = self.parallel_config.world_size
        self.worker_cls = resolve_obj_by_qualname(WORKER_CLS)
        self.procs: list[multiprocessing.process.BaseProcess] = []
        self.response_mqs: list[MessageQueue] = []
        self._wakeups: list[multiprocessing.connection.Connection] = []
        self.rpc_broadcast_mq = MessageQueue(self.world_size, max_chunk_bytes=1 << 22,
                                             max_chunks=16)
        atexit.register(self.shutdown)  # no orphans even if the user never calls shutdown()
        try:
            self._start_workers()
            self.collective_rpc("init_device")
            self.collective_rpc("load_model")
        except BaseException:
            self.shutdown()
            raise

    # ---- start-up ---------------------------------------------------------------------
    def _start_workers(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        init_method = f"tcp://127.0.0.1:{get_open_port()}"
        handle = self.rpc_broadcast_mq.export_handle()
        die_with_parent = threading.current_thread() is threading.main_thread()
        # The doorbell: a worker writes a byte after each reply, so a driver waiting through
        # a long step sleeps in select() instead of waking every millisecond to poll.
        self._bell_r, self._bell_w = ctx.Pipe(duplex=False)
        os.set_blocking(self._bell_r.fileno(), False)
        os.set_blocking(self._bell_w.fileno(), False)
        pipes = []
        for rank in range(self.world_size):
            reader, writer = ctx.Pipe(duplex=False)
            # And the other way: the driver rings each worker's after each call.
            wake_r, wake_w = ctx.Pipe(duplex=False)
            os.set_blocking(wake_w.fileno(), False)
            self._wakeups.append(wake_w)
            proc = ctx.Process(
                target=worker_main, name=f"fleetllm-worker-{rank}", daemon=True,
                args=(self.config, rank, rank, init_method, handle, writer, os.getpid(),
                      die_with_parent, WORKER_CLS, self._bell_w, wake_r),
            )
            try:
                proc.start()
            finally:
                wake_r.close()
            writer.close()
            self.procs.append(proc)
            pipes.append(reader)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        for rank, (proc, pipe) in enumerate(zip(self.procs, pipes)):
            ready = None
            while ready is None:
                if pipe.poll(0.1):
                    try:
                        ready = pipe.recv()
                    except EOFError:
                        ready = {"error": "exited during start-up (its error is in the log "
                                 "above; a script that starts engines must guard its entry "
                                 "point with `if __name__ == '__main__':`)"}
                elif not proc.is_alive():
                    ready = {"error": f"exited with code {proc.exitcode} during start-up"}
                elif time.monotonic() > deadline:
                    ready = {"error": f"did not start within {STARTUP_TIMEOUT_S:.0f} s"}
            pipe.close()
            if "error" in ready:
                raise WorkerCrashedError(f"worker rank {rank} (pid {proc.pid}) {ready['error']}")
            self.response_mqs.append(MessageQueue.create_from_handle(ready["handle"], 0))
        self.rpc_broadcast_mq.wait_until_ready(timeout=60)
        for mq in self.response_mqs:
            mq.wait_until_ready(timeout=60)
        self._stop_r, self._stop_w = multiprocessing.connection.Pipe(duplex=False)
        self._monitor = threading.Thread(target=self._monitor_workers, daemon=True,
                                         name="fleetllm-mp-monitor")
        self._monitor.start()

    def _monitor_workers(self) -> None:
        sentinels = {p.sentinel: (rank, p) for rank, p in enumerate(self.procs)}
        ready = multiprocessing.connection.wait([*sentinels, self._stop_r])
        if self._closed or self._stop_r in ready:
            return
        dead = [sentinels[s] for s in ready if s in sentinels]
        rank, proc = dead[0]
        proc.join(1.0)
        failure = WorkerCrashedError(
            f"worker rank {rank} (pid {proc.pid}) died with exit code {proc.exitcode}; the "
            "executor cannot continue: shut it down and start a new engine")
        logger.error("%s", failure)
        # Callbacks first, so whoever sees the failure also sees its consequences.
        for callback in self._failure_callbacks:
            try:
                callback()
            except Exception:
                logger.exception("failure callback raised")
        self._failure = failure
        self._ring()  # a waiting call wakes up and fails now

    def register_failure_callback(self, callback: FailureCallback) -> None:
        if self._failure is not None:
            callback()
        else:
            self._failure_callbacks.append(callback)

    # ---- calls ------------------------------------------------------------------------
    @property
    def execute_model_reply_rank(self) -> int:
        return self.output_rank

    def collective_rpc(self, method: str | Callable[..., Any], timeout: float | None = None,
                       args: tuple = (), kwargs: dict[str, Any] | None = None,
                       non_block: bool = False, return_exceptions: bool = False,
                       unique_reply_rank: int | None = None) -> list[Any]:
        if self._closed:
            raise RuntimeError("the executor has been shut down")
        if self._failure is not None:
            raise self._failure
        with self._lock:
            call_id = self._next_id
            self._next_id += 1
            expect = list(range(self.world_size)) if unique_reply_rank is None else [
                unique_reply_rank]
            call = _Call(call_id, method, expect)
            self._calls[call_id] = call
            message = rpc.make_request(call_id, method, args, kwargs or {},
                                       -1 if unique_reply_rank is None else unique_reply_rank)
            try:
                self.rpc_broadcast_mq.enqueue(message, timeout=timeout,
                                              should_abort=self._aborted)
                self._wake_workers()
            except TimeoutError:
                del self._calls[call_id]
                raise CommunicationTimeoutError(
                    f"could not hand collective_rpc({_name(method)!r}) to the workers within "
                    f"{timeout} s: they are still busy") from None
        futures = [CallFuture(self, call, rank, return_exceptions) for rank in expect]
        if non_block:
            return futures
        try:
            return [f.result(timeout) for f in futures]
        except CommunicationTimeoutError:
            with self._lock:
                self._calls.pop(call_id, None)  # its late replies will be dropped
            raise


    def _aborted(self) -> bool:
        return self._failure is not None or self._closed

    def _resolve(self, call: _Call, timeout: float | None, return_exceptions: bool) -> None:
        """Reads replies (for any call) until `call` is complete, fails, or times out."""
        with self._lock:
            self._waiters += 1
        try:
            self._wait_for(call, timeout)
        finally:
            with self._lock:
                self._waiters -= 1
        with self._lock:  # not on a timeout: a future may still be waited for again
            self._calls.pop(call.call_id, None)
        if call.error is not None and not isinstance(call.error, WorkerCrashedError):
            original, call.error = call.error, self._crash_behind(call.error)
            for rank, value in call.results.items():
                if value is original:
                    call.results[rank] = call.error
        if call.error is not None and not return_exceptions:
            raise call.error

    def _wait_for(self, call: _Call, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.0
        spin_until = time.monotonic() + SPIN_S
        while not call.done():
            if self._poll_once():
                pause = 0.0
                continue
            if self._failure is not None:
                call.error = self._failure
                return
            if deadline is not None and time.monotonic() > deadline:
                raise CommunicationTimeoutError(
                    f"collective_rpc({_name(call.method)!r}) did not finish within {timeout} s; "
                    "its late reply will be discarded")
            # Spin briefly, yielding the core (a no-op call answers in tens of microseconds,
            # and a sleep costs at least ~50 us of timer slack), then sleep until the
            # doorbell rings. A second waiting thread could miss a ring the first one
            # drained, so with company it backs off with short sleeps instead.
            if time.monotonic() < spin_until:
                os.sched_yield()
            elif self._waiters == 1:
                left = BELL_WAIT_S if deadline is None else deadline - time.monotonic()
                self._await_bell(min(BELL_WAIT_S, max(left, 0.0)))
            else:
                time.sleep(pause)
                pause = min(pause * 2 or 5e-5, 1e-3)

    def _await_bell(self, timeout: float) -> None:
        """Sleeps until a worker replies (or the monitor or shutdown rings), then drains."""
        fd = self._bell_r.fileno()
        if select.select([fd], [], [], timeout)[0]:
            try:
                os.read(fd, 1 << 16)
            except BlockingIOError:
                pass

    def _wake_workers(self) -> None:
        for wake in self._wakeups:
            try:
                os.write(wake.fileno(), b"\0")
            except (BlockingIOError, OSError):
                pass  # full: it is ringing already; closed: that worker is gone

    def _ring(self) -> None:
        try:
            os.write(self._bell_w.fileno(), b"\0")
        except (BlockingIOError, OSError):
            pass  # full: it is ringing already; closed: nobody waits any more

    def _crash_behind(self, error: BaseException) -> BaseException:
        """A peer's death usually reaches a surviving rank first as a communication error;
        report it as the crash it is."""
        # The reply can beat the dead process's exit, so a connection error waits for the
        # monitor too; any other exception is the worker's own and returns at once.
        broken_link = any(s in str(error) for s in _LINK_ERRORS)
        if not broken_link and all(p.is_alive() for p in self.procs):
            return error
        deadline = time.monotonic() + 1.0
        while self._failure is None and time.monotonic() < deadline:
            time.sleep(0.005)
        if self._failure is None:
            return error
        crash = WorkerCrashedError(str(self._failure).split("] ", 1)[-1])
        crash.__cause__ = error
        return crash

    def _poll_call(self, call: _Call) -> None:
        self._poll_once()

    def _poll_once(self) -> bool:
        got = False
        with self._lock:
            for mq in self.response_mqs:
                if mq.poll():
                    got = True
                    self._route(rpc.decode_response(mq.dequeue()))
        return got

    def _route(self, resp: rpc.RpcResponse) -> None:
        call = self._calls.get(resp.call_id)
        if call is None:  # a reply to a call that timed out or already completed
            if resp.error is not None:
                logger.error("worker rank %d failed call %d after it had completed: %s: %s",
                             resp.rank, resp.call_id, resp.error.type_name, resp.error.message)
            return
        if resp.error is not None:
            error = rpc.rebuild_error(resp.error, resp.rank)
            if resp.rank in call.expect:
                call.results[resp.rank] = error
            if resp.rank not in call.expect or len(call.expect) == 1:
                call.error = error  # a non-replying rank failed: the call cannot finish
            return
        call.results[resp.rank] = rpc.unpack_result(resp, self.worker_cls, call.method)

    # ---- health and shutdown ----------------------------------------------------------
    def check_health(self) -> None:
        if self._failure is not None:
            raise self._failure
        dead = [r for r, p in enumerate(self.procs) if not p.is_alive()]
        if dead:
            raise WorkerCrashedError(f"worker rank(s) {dead} are not running")
        self.collective_rpc("check_health", timeout=10)

    @property
    def max_concurrent_batches(self) -> int:
        """Pipeline stages each hold a step; with async scheduling (one worker), step N+1 is
        queued on the ring while step N runs."""
        pp = self.parallel_config.pipeline_parallel_size
        return pp if pp > 1 else (2 if self.scheduler_config.async_scheduling else 1)

    def shutdown(self) -> None:
        if getattr(self, "_closed", True):
            return
        self._closed = True
        if hasattr(self, "_stop_w"):
            self._stop_w.send(b"")
        alive = [p for p in self.procs if p.is_alive()]
        if alive and self._failure is None:
            try:
                self.rpc_broadcast_mq.enqueue(SHUTDOWN, timeout=1.0)
                self._wake_workers()
            except Exception:
                pass
        deadline = time.monotonic() + 5.0
        for p in self.procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in self.procs:
            if p.is_alive():
                p.terminate()
                p.join(2.0)
            if p.is_alive():
                p.kill()
                p.join(2.0)
        for mq in self.response_mqs:
            mq.close()
        for proc, mq in zip(self.procs, self.response_mqs):
            if proc.exitcode != 0 and reclaim_orphan(mq.handle):
                logger.info("reclaimed the reply queue of worker pid %d", proc.pid)
        self.rpc_broadcast_mq.close()
        if hasattr(self, "_monitor"):
            self._monitor.join(2.0)
            self._stop_r.close()
        if hasattr(self, "_bell_r"):
            self._bell_r.close()
            self._bell_w.close()
        for wake in self._wakeups:
            wake.close()
            self._stop_w.close()
        for p in self.procs:
            p.close()
        self.procs = []
        atexit.unregister(self.shutdown)


def _name(method: Any) -> str:
    return getattr(method, "__name__", str(method))
