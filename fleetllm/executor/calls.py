"""The one call table of the multi-worker executors (mp and Ray).

A backend is only a transport: it sends a call's bytes to every rank, hands back replies as
they come, and tells the table when a rank dies. Everything else lives here, once:
- call ids, so a reply that arrives after its call timed out is dropped, never taken as the
  answer to a later call;
- reply routing and the error rules (a failed replying rank fills its slot; a failed rank
  that was not to reply ends the call, which cannot finish without it);
- the failure state and its callbacks (fired once per failure, under the lock that
  registration takes too, so a callback registered during a failure still runs);
- the wait and timeout policy (spin briefly, then sleep on the transport);
- typed crash signals: a rank's death comes from the transport's monitor, and a collective
  broken by a dead peer arrives as WorkerCrashedError from the worker itself
  (distributed/comm.py), so no error text is matched.

After a failure the table stays failed until reset(), which restart_failed_workers calls
once a fresh worker group is up; registered callbacks are kept for the next failure.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from fleetllm.errors import CommunicationTimeoutError, WorkerCrashedError
from fleetllm.executor import rpc
from fleetllm.executor.futures import CallFuture

logger = logging.getLogger(__name__)

FailureCallback = Callable[[], None]
# The longest a waiter sleeps on the transport at once: a failure or shutdown wakes it
# sooner, and a deadline shortens it; this only bounds a missed wake-up.
MAX_SLEEP_S = 0.05
# A peer's death usually reaches a surviving rank (as a broken collective) a few ms before
# the monitor sees the process end; this long the table waits to name the rank that died.
CRASH_GRACE_S = 0.5


@dataclass
class Reply:
    """What a transport hands back: a rank's encoded RpcResponse, or its death."""

    rank: int
    data: bytes = b""  # empty: a rank that was not to reply finished the call fine
    call_id: int = -1  # known to transports that track calls themselves (Ray); else decoded
    died: str | None = None  # why the rank died


class Transport(Protocol):
    world_size: int
    spin_s: float  # how long a waiter spins before it sleeps (0: sleep at once)

    def send(self, call_id: int, message: bytes, timeout: float | None,
             dead: set[int]) -> None:
        """Hands one call to every rank not in dead; TimeoutError if they cannot take it in
        time."""

    def drain(self) -> list[Reply]:
        """Replies that have arrived, without waiting."""

    def sleep(self, timeout: float) -> None:
        """Sleeps until a reply may have arrived, or timeout seconds."""

    def wake(self) -> None:
        """Ends a sleep() in another thread (a failure or shutdown happened)."""


class Call:
    __slots__ = ("call_id", "method", "expect", "results", "error", "deadline", "hang_is_crash",
                 "partial")

    def __init__(self, call_id: int, method: Any, expect: list[int],
                 deadline: float | None, hang_is_crash: bool, partial: bool = False) -> None:
        self.call_id = call_id
        self.method = method
        self.expect = expect  # ranks whose reply completes the call
        self.results: dict[int, Any] = {}
        self.error: BaseException | None = None
        # The call's own deadline (execute_model's hang timeout), whoever waits for it.
        self.deadline = deadline
        self.hang_is_crash = hang_is_crash
        # Sent after a failure with return_exceptions: the surviving ranks answer, and a
        # dead rank's slot holds its crash.
        self.partial = partial

    def done(self) -> bool:
        return self.error is not None or len(self.results) == len(self.expect)

    def missing(self) -> list[int]:
        return [r for r in self.expect if r not in self.results]


def method_name(method: Any) -> str:
    return getattr(method, "__name__", str(method))


class CallTable:
    def __init__(self, transport: Transport, worker_cls: type) -> None:
        self.transport = transport
        self.worker_cls = worker_cls
        self.lock = threading.RLock()
        self.calls: dict[int, Call] = {}
        self.failure: WorkerCrashedError | None = None
        self.dead: dict[int, WorkerCrashedError] = {}  # rank -> how it died
        self.closed = False
        self._callbacks: list[FailureCallback] = []
        self._next_id = 0
        self._waiters = 0

    # ---- failure ----------------------------------------------------------------------
    def register_failure_callback(self, callback: FailureCallback) -> None:
        with self.lock:
            self._callbacks.append(callback)
            failed = self.failure is not None
        if failed:
            callback()

    def fail(self, failure: WorkerCrashedError) -> WorkerCrashedError:
        """Enters the failed state (first caller wins), fires the callbacks, and fails every
        pending call. Returns the failure in force."""
        with self.lock:
            if self.failure is not None or self.closed:
                return self.failure or failure
            logger.error("%s", failure)
            # Callbacks first, so whoever sees the failure also sees its consequences.
            for callback in self._callbacks:
                try:
                    callback()
                except Exception:
                    logger.exception("failure callback raised")
            self.failure = failure
            for call in self.calls.values():
                if not call.partial:
                    call.error = call.error or failure
        self.transport.wake()
        return failure

    def rank_died(self, rank: int, detail: str) -> WorkerCrashedError:
        """The transport's monitor saw a rank die: the typed crash signal."""
        crash = WorkerCrashedError(
            f"worker rank {rank} {detail}; restart_failed_workers() starts a new worker group")
        with self.lock:
            self.dead.setdefault(rank, crash)
            for call in self.calls.values():
                if call.partial and rank in call.expect:
                    call.results.setdefault(rank, crash)
        return self.fail(crash)

    def reset(self, transport: Transport) -> None:
        """A fresh worker group is up: forget the failure and the old group's calls."""
        with self.lock:
            for call in self.calls.values():
                call.error = call.error or WorkerCrashedError(
                    "the worker group was restarted while this call was pending")
            self.calls.clear()
            self.transport = transport
            self.failure = None
            self.dead.clear()

    def close(self) -> None:
        with self.lock:
            self.closed = True
        self.transport.wake()

    def check_usable(self, partial_ok: bool = False) -> None:
        if self.closed:
            raise RuntimeError("the executor has been shut down")
        if self.failure is not None and not (partial_ok and self.dead):
            raise self.failure

    # ---- calls ------------------------------------------------------------------------
    def submit(self, method: str | Callable[..., Any], args: tuple, kwargs: dict[str, Any],
               unique_reply_rank: int | None, timeout: float | None = None,
               hang_timeout: float | None = None, return_exceptions: bool = False) -> Call:
        """Sends one call; hang_timeout is the call's own deadline, past which its workers
        count as hung (a crash), whoever waits for it."""
        world = self.transport.world_size
        if unique_reply_rank is not None and not 0 <= unique_reply_rank < world:
            raise ValueError(f"unique_reply_rank={unique_reply_rank} is not a rank of this "
                             f"executor (world size {world})")
        self.check_usable(partial_ok=return_exceptions)
        expect = list(range(world)) if unique_reply_rank is None else [unique_reply_rank]
        deadline = None if hang_timeout is None else time.monotonic() + hang_timeout
        with self.lock:
            call = Call(self._next_id, method, expect, deadline, hang_timeout is not None,
                        partial=self.failure is not None)
            call.results.update({r: e for r, e in self.dead.items() if r in expect})
            self._next_id += 1
            self.calls[call.call_id] = call
            message = rpc.make_request(call.call_id, method, args, kwargs,
                                       -1 if unique_reply_rank is None else unique_reply_rank)
            try:
                self.transport.send(call.call_id, message, timeout, set(self.dead))
            except TimeoutError:
                del self.calls[call.call_id]
                raise CommunicationTimeoutError(
                    f"could not hand collective_rpc({method_name(method)!r}) to the workers "
                    f"within {timeout} s: they are still busy") from None
        return call

    def futures(self, call: Call, return_exceptions: bool) -> list[CallFuture]:
        return [CallFuture(self, call, rank, return_exceptions) for rank in call.expect]

    def collective_rpc(self, method: str | Callable[..., Any], timeout: float | None,
                       args: tuple, kwargs: dict[str, Any] | None, non_block: bool,
                       return_exceptions: bool, unique_reply_rank: int | None,
                       hang_timeout: float | None = None) -> list[Any]:
        call = self.submit(method, args, kwargs or {}, unique_reply_rank, timeout, hang_timeout,
                           return_exceptions)
        futures = self.futures(call, return_exceptions)
        if non_block:
            return futures
        try:
            return [f.result(timeout) for f in futures]
        except CommunicationTimeoutError:
            self.forget(call)  # its late replies will be dropped
            raise

    def forget(self, call: Call) -> None:
        with self.lock:
            self.calls.pop(call.call_id, None)

    # ---- waiting (CallFuture's _resolve / _poll_call) ---------------------------------
    def _resolve(self, call: Call, timeout: float | None, return_exceptions: bool) -> None:
        """Collects replies (for any call) until `call` is complete, fails, or times out."""
        with self.lock:
            self._waiters += 1
        try:
            self._wait_for(call, timeout)
        finally:
            with self.lock:
                self._waiters -= 1
        self.forget(call)  # not on a timeout: a future may still be waited for again
        if isinstance(call.error, WorkerCrashedError) and call.error is not self.failure:
            call.error = self._crash_behind(call.error)
        if call.error is not None and not return_exceptions:
            raise call.error

    def _poll_call(self, call: Call) -> None:
        self._collect()

    def _wait_for(self, call: Call, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        spin_until = time.monotonic() + self.transport.spin_s
        pause = 0.0
        while not call.done():
            if self._collect():
                pause = 0.0
                continue
            if self.failure is not None and not call.partial:
                call.error = call.error or self.failure
                return
            if self.closed:
                call.error = RuntimeError("the executor was shut down during the call")
                return
            now = time.monotonic()
            if call.deadline is not None and now > call.deadline:
                self._hung(call)
                continue
            if deadline is not None and now > deadline:
                raise CommunicationTimeoutError(
                    f"collective_rpc({method_name(call.method)!r}) did not finish within "
                    f"{timeout} s on rank(s) {call.missing()}; its late reply will be "
                    "discarded")
            ends = [d for d in (deadline, call.deadline) if d is not None]
            left = max(0.0, min(ends) - now) if ends else MAX_SLEEP_S
            # Spin briefly, yielding the core (a no-op call answers in tens of microseconds),
            # then sleep on the transport. A second waiting thread could miss a wake-up the
            # first one consumed, so with company it backs off with short sleeps instead.
            if now < spin_until:
                os.sched_yield()
            elif self._waiters == 1:
                self.transport.sleep(min(MAX_SLEEP_S, left))
            else:
                time.sleep(min(pause, left))
                pause = min(pause * 2 or 5e-5, 1e-3)

    def _hung(self, call: Call) -> None:
        if not call.hang_is_crash:
            return
        self.fail(WorkerCrashedError(
            f"{method_name(call.method)} ran longer than execute_model_timeout_s on rank(s) "
            f"{call.missing()}: the workers are hung (stopped, deadlocked or stuck in a "
            "collective); restart_failed_workers() replaces them"))

    def _crash_behind(self, error: WorkerCrashedError) -> WorkerCrashedError:
        """A rank's collective failed: the group is broken. Waits briefly for the monitor
        to name the rank that died, and fails the table with that (or with this)."""
        deadline = time.monotonic() + CRASH_GRACE_S
        while not self.dead and self.failure is None and time.monotonic() < deadline:
            time.sleep(0.005)
        with self.lock:
            if self.failure is None and not self.dead:
                return self.fail(error)
            return self.failure or next(iter(self.dead.values()))

    def _collect(self) -> bool:
        with self.lock:
            replies = self.transport.drain()
            for reply in replies:
                self._route(reply)
        return bool(replies)

    def _route(self, reply: Reply) -> None:
        if reply.died is not None:
            self.rank_died(reply.rank, f"died ({reply.died})")
            return
        if not reply.data:
            return
        resp = rpc.decode_response(reply.data)
        call = self.calls.get(resp.call_id)
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
            if isinstance(error, WorkerCrashedError):  # a collective lost a peer
                call.error = error  # the group is broken: the call cannot finish
            return
        call.results[resp.rank] = rpc.unpack_result(resp, self.worker_cls, call.method)
