"""MultiprocExecutor: one spawned process per rank.

Calls go out on one shared-memory broadcast ring (one writer, N readers); each worker
answers on its own ring. Every call carries an id, so a reply that arrives after its call
timed out is dropped instead of being taken for a later call's answer. A monitor thread
watches the worker processes: a death fails pending calls with WorkerCrashedError and fires
the failure callback once. Waiting happens in the caller's thread (no hand-off latency).
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import select
import socket
import threading
import time
import weakref
from typing import Any

from fleetllm.errors import WorkerCrashedError
from fleetllm.executor.abstract import WorkerGroupExecutor
from fleetllm.executor.calls import CallTable, Reply
from fleetllm.executor.shm_queue import MessageQueue, reclaim_orphan
from fleetllm.executor.worker_proc import SHUTDOWN, worker_main
from fleetllm.worker.worker_base import resolve_obj_by_qualname

logger = logging.getLogger(__name__)

WORKER_CLS = "fleetllm.worker.worker.Worker"
STARTUP_TIMEOUT_S = 300.0
SPIN_S = 2e-4


def get_open_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _WorkerGroup:
    """One generation of worker processes and their rings: the mp transport of the call
    table. restart_failed_workers closes a group and starts the next one."""

    spin_s = SPIN_S

    def __init__(self, config: Any, world_size: int) -> None:
        self.config = config
        self.world_size = world_size
        self.procs: list[multiprocessing.process.BaseProcess] = []
        self.response_mqs: list[MessageQueue] = []
        self._wakeups: list[multiprocessing.connection.Connection] = []
        self.dropped: set[int] = set()  # dead ranks the ring no longer waits for
        self._closed = False
        self._monitor: threading.Thread | None = None
        self._stop_r = self._stop_w = None
        self.rpc_broadcast_mq = MessageQueue(world_size, max_chunk_bytes=1 << 22,
                                             max_chunks=16)
        ctx = multiprocessing.get_context("spawn")
        # The doorbell: a worker writes a byte after each reply, so a driver waiting through
        # a long step sleeps in select() instead of waking every millisecond to poll.
        self._bell_r, self._bell_w = ctx.Pipe(duplex=False)
        os.set_blocking(self._bell_r.fileno(), False)
        os.set_blocking(self._bell_w.fileno(), False)

    # ---- start-up ---------------------------------------------------------------------
    def start(self, table: CallTable) -> None:
        ctx = multiprocessing.get_context("spawn")
        init_method = f"tcp://127.0.0.1:{get_open_port()}"
        handle = self.rpc_broadcast_mq.export_handle()
        die_with_parent = threading.current_thread() is threading.main_thread()
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
        try:
            for rank, (proc, pipe) in enumerate(zip(self.procs, pipes)):
                self.response_mqs.append(_await_worker_ready(rank, proc, pipe))
        finally:
            for pipe in pipes:
                pipe.close()
        self.rpc_broadcast_mq.wait_until_ready(timeout=60)
        for mq in self.response_mqs:
            mq.wait_until_ready(timeout=60)
        self._stop_r, self._stop_w = multiprocessing.connection.Pipe(duplex=False)
        # The monitor holds the group and the table, never the executor, so dropping the
        # executor still lets its finalizer run.
        self._monitor = threading.Thread(target=_monitor_workers, daemon=True,
                                         args=(self.procs, self._stop_r, table, self),
                                         name="fleetllm-mp-monitor")
        self._monitor.start()

    # ---- the transport ----------------------------------------------------------------
    def send(self, call_id: int, message: bytes, timeout: float | None,
             dead: set[int]) -> None:
        self.rpc_broadcast_mq.enqueue(message, timeout=timeout, should_abort=self._aborted)
        self._wake_workers()

    def _aborted(self) -> bool:
        """A live reader that died would never free its chunk: stop waiting for it."""
        return self._closed or any(not p.is_alive() for r, p in enumerate(self.procs)
                                   if r not in self.dropped)

    def drain(self) -> list[Reply]:
        replies = []
        for rank, mq in enumerate(self.response_mqs):
            while rank not in self.dropped and mq.poll():
                replies.append(Reply(rank, mq.dequeue()))
        return replies

    def sleep(self, timeout: float) -> None:
        """Sleeps until a worker replies (or the monitor or shutdown rings), then drains."""
        fd = self._bell_r.fileno()
        if select.select([fd], [], [], timeout)[0]:
            try:
                os.read(fd, 1 << 16)
            except BlockingIOError:
                pass

    def wake(self) -> None:
        try:
            os.write(self._bell_w.fileno(), b"\0")
        except (BlockingIOError, OSError):
            pass  # full: it is ringing already; closed: nobody waits any more

    def _wake_workers(self) -> None:
        for wake in self._wakeups:
            try:
                os.write(wake.fileno(), b"\0")
            except (BlockingIOError, OSError):
                pass  # full: it is ringing already; closed: that worker is gone

    def drop_rank(self, rank: int) -> None:
        """A dead rank: the survivors keep receiving calls (partial results)."""
        if self._closed or rank in self.dropped:
            return
        self.dropped.add(rank)
        self.rpc_broadcast_mq.drop_reader(rank)

    # ---- shutdown ---------------------------------------------------------------------
    def close(self, graceful: bool) -> None:
        """Ends every process of the group (asking first when graceful, killing at once
        otherwise: a hung or stopped worker cannot answer) and frees its rings and pipes."""
        if self._closed:
            return
        self._closed = True
        if self._stop_w is not None:
            self._stop_w.send(b"")
        if graceful and all(p.is_alive() for p in self.procs):
            try:
                self.rpc_broadcast_mq.enqueue(SHUTDOWN, timeout=1.0)
                self._wake_workers()
            except Exception:
                graceful = False
        if graceful:
            deadline = time.monotonic() + 5.0
            for p in self.procs:
                p.join(max(0.0, deadline - time.monotonic()))
        for p in self.procs:
            if p.is_alive() and graceful:
                p.terminate()
                p.join(2.0)
            if p.is_alive():
                p.kill()  # SIGKILL also ends a SIGSTOPped process
                p.join(2.0)
        for mq in self.response_mqs:
            mq.close()
        for proc, mq in zip(self.procs, self.response_mqs):
            if proc.exitcode != 0 and reclaim_orphan(mq.handle):
                logger.info("reclaimed the reply queue of worker pid %d", proc.pid)
        self.rpc_broadcast_mq.close()
        if self._monitor is not None and self._monitor is not threading.current_thread():
            self._monitor.join(2.0)
        for conn in (self._stop_r, self._stop_w, self._bell_r, self._bell_w, *self._wakeups):
            if conn is not None:
                conn.close()
        for p in self.procs:
            if p.exitcode is not None:
                p.close()
        self.procs = []


def _await_worker_ready(rank: int, proc: multiprocessing.process.BaseProcess,
                        pipe: multiprocessing.connection.Connection) -> MessageQueue:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    ready = None
    while ready is None:
        if pipe.poll(0.1):
            try:
                ready = pipe.recv()
            except EOFError:
                ready = {"error": "exited during start-up (its error is in the log above; "
                         "a script that starts engines must guard its entry point with "
                         "`if __name__ == '__main__':`)"}
        elif not proc.is_alive():
            ready = {"error": f"exited with code {proc.exitcode} during start-up"}
        elif time.monotonic() > deadline:
            ready = {"error": f"did not start within {STARTUP_TIMEOUT_S:.0f} s"}
    if "error" in ready:
        raise WorkerCrashedError(f"worker rank {rank} (pid {proc.pid}) {ready['error']}")
    return MessageQueue.create_from_handle(ready["handle"], 0)


def _monitor_workers(procs: list[multiprocessing.process.BaseProcess],
                     stop: multiprocessing.connection.Connection, table: CallTable,
                     group: _WorkerGroup) -> None:
    """Turns each worker death into the table's typed crash signal, at once."""
    sentinels = {p.sentinel: (rank, p) for rank, p in enumerate(procs)}
    while sentinels:
        ready = multiprocessing.connection.wait([*sentinels, stop])
        if stop in ready or group._closed:
            return
        for s in ready:
            rank, proc = sentinels.pop(s)
            proc.join(1.0)
            with table.lock:  # the ring must skip it before anyone sends again
                group.drop_rank(rank)
            table.rank_died(rank, f"(pid {proc.pid}) died with exit code {proc.exitcode}")


class MultiprocExecutor(WorkerGroupExecutor):

    def _init_executor(self) -> None:
        self.world_size = self.parallel_config.world_size
        self.worker_cls = resolve_obj_by_qualname(WORKER_CLS)
        # The finalizer closes whatever group is current; it holds this list, not the
        # executor, so dropping the executor ends its workers.
        self._groups: list[_WorkerGroup] = []
        self._finalizer = weakref.finalize(self, _close_groups, self._groups, True)
        group = self._new_group()
        self.table = CallTable(group, self.worker_cls)
        try:
            self._start(group)
        except BaseException:
            self.shutdown()
            raise

    def _new_group(self) -> _WorkerGroup:
        group = _WorkerGroup(self.config, self.world_size)
        self._groups.append(group)
        return group

    def _start(self, group: _WorkerGroup) -> None:
        group.start(self.table)
        self.collective_rpc("init_device")
        self.collective_rpc("load_model")

    @property
    def procs(self) -> list[multiprocessing.process.BaseProcess]:
        return self._groups[-1].procs if self._groups else []

    def _replace_workers(self) -> None:
        old = self._groups.pop()
        old.close(graceful=False)
        group = self._new_group()
        self.table.reset(group)
        self._start(group)

    # ---- health and shutdown ----------------------------------------------------------
    def check_health(self) -> None:
        self.table.check_usable()
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
        table = getattr(self, "table", None)
        if table is not None:
            table.close()
            if table.failure is not None:  # survivors may be stuck: no goodbyes
                for group in self._groups:
                    group.close(graceful=False)
        if hasattr(self, "_finalizer"):
            self._finalizer()


def _close_groups(groups: list[_WorkerGroup], graceful: bool) -> None:
    for group in groups:
        try:
            group.close(graceful and group.procs and all(p.is_alive() for p in group.procs))
        except Exception:
            logger.warning("closing a worker group failed", exc_info=True)
    groups.clear()
