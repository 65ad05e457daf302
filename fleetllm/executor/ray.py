"""RayDistributedExecutor: one Ray actor per rank, placed in a placement group.

Calls travel as the same typed msgspec messages as the mp backend's (rpc.py): the driver
sends request bytes to every actor's execute_method and gets response bytes back, so
arguments arrive typed and fleetllm errors are rebuilt as their own types. An actor runs
its calls one at a time in the order sent, so a call that timed out keeps the worker busy
and later calls queue behind it, and every rank enters its collectives in the same order.

Each actor also holds a "sentinel" call that never returns; its reference resolves only
when the actor dies. A monitor thread waits on the sentinels, so a death is seen within
milliseconds, fires the failure callbacks once and fails every later call with
WorkerCrashedError. Pending calls fail on their own: the dead rank's share of them resolves
with Ray's ActorDiedError.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil
import torch

from fleetllm.config import EngineConfig
from fleetllm.errors import CommunicationTimeoutError, ConfigurationError, WorkerCrashedError
from fleetllm.executor import rpc
from fleetllm.executor.abstract import Executor, FailureCallback
from fleetllm.executor.futures import CallFuture
from fleetllm.executor.multiproc import WORKER_CLS, get_open_port
from fleetllm.worker.worker_base import WorkerWrapperBase, resolve_obj_by_qualname

try:
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError
    from ray.util.placement_group import (
        PlacementGroup,
        get_current_placement_group,
        placement_group,
        remove_placement_group,
    )
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
except ImportError as e:
    raise ImportError(
        "distributed_executor_backend='ray' needs Ray, which is not installed: run "
        "`pip install -e .[ray]` (or `pip install 'ray>=2.40'`)"
    ) from e

logger = logging.getLogger(__name__)

# Ray only uses this to place actors; a small share lets a tp x pp layout fit on a machine
# with fewer cores than ranks, as the mp backend does.
CPUS_PER_WORKER = 0.5
STARTUP_TIMEOUT_S = 300.0
PLACEMENT_TIMEOUT_S = 60.0
HEALTH_TIMEOUT_S = 10.0
# How long a call that failed early waits for its unfinished ranks' fate: a peer's death
# usually reaches a surviving rank (as a broken collective) a few ms before Ray reports it.
CRASH_GRACE_S = 0.5
# Arguments above Ray's inline limit go to the object store once, not once per actor.
_PUT_THRESHOLD_BYTES = 100 * 1024
# ray.wait and ray.get start a new session when there is none; the monitor thread must not,
# if a ray.shutdown() elsewhere lands between its is_initialized() check and its call.
_wait_no_autostart = getattr(ray.wait, "__wrapped__", ray.wait)
_get_no_autostart = getattr(ray.get, "__wrapped__", ray.get)


@ray.remote(concurrency_groups={"monitor": 1})
class RayWorkerWrapper:
    """One rank. Its calls run one at a time, in the order sent, on the default group's
    single thread; the "monitor" group's thread only holds the sentinel."""

    def __init__(self, rank: int, worker_cls: str, omp_threads: int | None) -> None:
        # Ray exports OMP_NUM_THREADS=1 to its workers. Unless the driver set a number, drop
        # it so the Worker picks cores // world_size, as it does under the mp backend.
        if omp_threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = str(omp_threads)
            torch.set_num_threads(omp_threads)  # torch read the variable when imported
        logging.basicConfig(level=logging.INFO,
                            format=f"%(levelname)s rank{rank} %(name)s: %(message)s")
        self.rank = rank
        self.wrapper = WorkerWrapperBase(rpc_rank=rank, worker_cls=worker_cls)
        self.worker_type = resolve_obj_by_qualname(worker_cls)

    def node_info(self) -> tuple[str, str, int, int]:
        """(node id, node IP, pid, a free port on this node)."""
        return (ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address(),
                os.getpid(), get_open_port())

    def init_worker(self, config: EngineConfig, local_rank: int, init_method: str) -> None:
        # The config goes through Ray's pickling, as it goes through spawn's under mp: the
        # typed messages decode by the Worker's annotations, and init_worker is not its method.
        self.wrapper.init_worker(config, local_rank=local_rank, rank=self.rank,
                                 distributed_init_method=init_method,
                                 is_driver_worker=self.rank == 0)

    def execute_method(self, data: bytes) -> bytes:
        """Runs one rpc request; b"" when this rank succeeded but is not the reply rank."""
        call_id = -1
        try:
            req = rpc.decode_request(data)
            call_id = req.call_id
            method, args, kwargs = rpc.unpack_request(req, self.worker_type)
            result = self.wrapper.execute_method(method, *args, **kwargs)
            if req.reply_rank >= 0 and req.reply_rank != self.rank:
                return b""
            return rpc.make_response(call_id, self.rank, result, pickled=bool(req.pickled))
        except Exception as e:
            logger.debug("rpc %d failed", call_id, exc_info=True)
            return rpc.make_error(call_id, self.rank, e)

    @ray.method(concurrency_group="monitor")
    def sentinel(self) -> None:
        """Never returns: its reference resolves (with ActorDiedError) when this actor dies."""
        threading.Event().wait()


class _Call:
    __slots__ = ("method", "pending", "expect", "results", "error")

    def __init__(self, method: Any, refs: list[ray.ObjectRef], expect: list[int]) -> None:
        self.method = method
        self.pending: dict[ray.ObjectRef, int] = {ref: rank for rank, ref in enumerate(refs)}
        self.expect = expect  # ranks whose reply completes the call
        self.results: dict[int, Any] = {}
        self.error: BaseException | None = None

    def done(self) -> bool:
        return self.error is not None or all(r in self.results for r in self.expect)


class RayDistributedExecutor(Executor):
    uses_ray = True
    supports_pp = True

    def _init_executor(self) -> None:
        self._closed = False
        self._failure: WorkerCrashedError | None = None
        self._failure_callbacks: list[FailureCallback] = []
        self._lock = threading.RLock()
        self._call_ids = itertools.count()
        self.world_size = self.parallel_config.world_size
        self.worker_cls = resolve_obj_by_qualname(WORKER_CLS)
        self.workers: list[ray.actor.ActorHandle] = []
        self._sentinels: list[ray.ObjectRef] = []
        self._monitor: threading.Thread | None = None
        self._local_procs: list[psutil.Process] = []
        self._own_pg: PlacementGroup | None = None
        self._pids: list[int] = []
        self._started_ray = False
        self._ready = False
        try:
            self._start_ray()
            # After ray.init, so at exit this runs before Ray's own atexit shutdown: no
            # orphans even if the user never calls shutdown().
            atexit.register(self.shutdown)
            self._start_workers()
            self.collective_rpc("init_device", timeout=STARTUP_TIMEOUT_S)
            self.collective_rpc("load_model", timeout=STARTUP_TIMEOUT_S)
            self._ready = True
        except BaseException:
            self.shutdown()
            raise

    # ---- start-up ---------------------------------------------------------------------
    def _start_ray(self) -> None:
        if ray.is_initialized():
            return  # the caller's session (and its placement group, if any) is used as is
        start = time.perf_counter()
        if os.environ.get("RAY_ADDRESS"):
            # Joining an existing cluster: its resources are fixed, so none may be declared.
            ray.init(log_to_driver=True, ignore_reinit_error=True)
        else:
            cpus = max(os.cpu_count() or 1, math.ceil(self.world_size * CPUS_PER_WORKER))
            # log_to_driver: worker logs and tracebacks reach this terminal, as under mp.
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=True,
                     ignore_reinit_error=True)
        self._started_ray = True
        logger.info("started Ray in %.2f s", time.perf_counter() - start)

    def _placement_group(self) -> PlacementGroup:
        pg = get_current_placement_group()
        if pg is not None:
            if len(pg.bundle_specs) < self.world_size:
                raise ConfigurationError(
                    f"the current Ray placement group has {len(pg.bundle_specs)} bundles, "
                    f"fewer than the {self.world_size} ranks (one bundle each) need")
            return pg
        bundle = {"GPU": 1.0} if self._on_cuda else {"CPU": CPUS_PER_WORKER}
        pg = placement_group([dict(bundle) for _ in range(self.world_size)], strategy="PACK")
        self._own_pg = pg
        try:
            ray.get(pg.ready(), timeout=PLACEMENT_TIMEOUT_S)
        except GetTimeoutError:
            raise ConfigurationError(
                f"Ray could not reserve {self.world_size} bundles of {bundle} within "
                f"{PLACEMENT_TIMEOUT_S:.0f} s; the cluster has {ray.available_resources()} "
                "available") from None
        return pg

    @property
    def _on_cuda(self) -> bool:
        return self.device_config.device == "cuda"

    def _start_workers(self) -> None:
        pg = self._placement_group()
        omp = os.environ.get("OMP_NUM_THREADS", "")
        omp_threads = int(omp) if omp.isdigit() and int(omp) > 0 else None
        for rank in range(self.world_size):
            bundle = pg.bundle_specs[rank]
            if self._on_cuda and bundle.get("GPU", 0) < 1:
                raise ConfigurationError(
                    f"bundle {rank} of the current placement group has no GPU: {bundle}")
            strategy = PlacementGroupSchedulingStrategy(
                placement_group=pg, placement_group_bundle_index=rank,
                placement_group_capture_child_tasks=True)
            actor = RayWorkerWrapper.options(
                num_cpus=0 if self._on_cuda else min(CPUS_PER_WORKER, bundle.get("CPU", 0)),
                num_gpus=1 if self._on_cuda else 0,
                scheduling_strategy=strategy,
            ).remote(rank, WORKER_CLS, omp_threads)
            self.workers.append(actor)
        infos = _get_at_startup([w.node_info.remote() for w in self.workers])
        self._pids = [pid for _, _, pid, _ in infos]
        # The sentinels go out first, so a death while loading the model is noticed too.
        self._sentinels = [w.sentinel.remote() for w in self.workers]
        self._monitor = threading.Thread(target=self._monitor_workers, daemon=True,
                                         name="fleetllm-ray-monitor")
        self._monitor.start()
        here = ray.get_runtime_context().get_node_id()
        self._local_procs = [psutil.Process(pid) for node, _, pid, _ in infos if node == here]
        node0, ip0, _, port = infos[0]
        # Loopback when every rank shares one node: it always works and needs no interface.
        host = "127.0.0.1" if all(node == node0 for node, *_ in infos) else ip0
        init_method = f"tcp://{host}:{port}"
        # Ray makes an actor's own GPU its only visible device, so on CUDA it is device 0.
        _get_at_startup([w.init_worker.remote(self.config, 0 if self._on_cuda else rank,
                                              init_method)
                         for rank, w in enumerate(self.workers)])
        logger.info("started %d Ray workers (pids %s), rendezvous at %s", self.world_size,
                    self._pids, init_method)

    # ---- failure ----------------------------------------------------------------------
    def _monitor_workers(self) -> None:
        ranks = {ref: rank for rank, ref in enumerate(self._sentinels)}
        while not self._closed:
            try:
                # The timeout only bounds how long shutdown waits for this thread.
                ready, _ = _wait_no_autostart(list(ranks), num_returns=1, timeout=1.0)
            except BaseException as e:
                # Ray itself is gone, and the actors with it: a ray.shutdown() elsewhere ends
                # a blocked wait with SystemExit, and a later one fails.
                if not self._closed:
                    shut_down = isinstance(e, SystemExit) or not ray.is_initialized()
                    self._declare_failure(None, None if shut_down else e)
                return
            if ready and not self._closed:
                try:
                    _get_no_autostart(ready[0])
                    cause: BaseException | None = None
                except BaseException as e:
                    cause = e
                if ray.is_initialized():
                    self._declare_failure(ranks[ready[0]], cause)
                else:  # a ray.shutdown() elsewhere took the actors down
                    self._declare_failure(None, None)
                return

    def _declare_failure(self, rank: int | None, cause: BaseException | None
                         ) -> WorkerCrashedError:
        """The executor's permanent failure; the first caller (the monitor, or a call that
        saw a dead rank first) fires the callbacks, once."""
        pid = self._pids[rank] if rank is not None and rank < len(self._pids) else "?"
        who = "the Ray session" if rank is None else f"worker rank {rank} (Ray actor pid {pid})"
        why = "ray.shutdown() was called" if cause is None else (
            # Ray's last line says why ("...because it was killed by `ray.kill`"); its full
            # text stays attached as the cause.
            str(cause).strip().splitlines()[-1].split(". ")[0].rstrip("."))
        with self._lock:
            if self._closed and self._failure is None:
                # shutdown() killed it: nothing to report, but the call still cannot finish.
                return WorkerCrashedError(f"{who} was stopped by shutdown()")
            if self._failure is None:
                failure = WorkerCrashedError(
                    f"{who} died ({why}); the executor cannot continue: shut it down and "
                    "start a new engine")
                failure.__cause__ = cause
                logger.error("%s", failure)
                # Callbacks first, so whoever sees the failure also sees its consequences.
                for callback in self._failure_callbacks:
                    try:
                        callback()
                    except Exception:
                        logger.exception("failure callback raised")
                self._failure = failure
            return self._failure

    def register_failure_callback(self, callback: FailureCallback) -> None:
        with self._lock:
            if self._failure is None:
                self._failure_callbacks.append(callback)
                return
        callback()

    # ---- calls ------------------------------------------------------------------------
    @property
    def execute_model_reply_rank(self) -> int:
        return self.output_rank

    def collective_rpc(self, method: str | Callable[..., Any], timeout: float | None = None,
                       args: tuple = (), kwargs: dict[str, Any] | None = None,
                       non_block: bool = False, return_exceptions: bool = False,
                       unique_reply_rank: int | None = None) -> list[Any]:
        self._check_usable()
        call = self._submit(method, args, kwargs or {}, unique_reply_rank)
        futures = [CallFuture(self, call, rank, return_exceptions) for rank in call.expect]
        if non_block:
            return futures
        return [f.result(timeout) for f in futures]

    def _check_usable(self) -> None:
        if self._closed:
            raise RuntimeError("the executor has been shut down")
        if self._failure is None and not ray.is_initialized():
            self._declare_failure(None, None)  # else .remote() would start a new session
        if self._failure is not None:
            raise self._failure

    def _submit(self, method: str | Callable[..., Any], args: tuple, kwargs: dict[str, Any],
                unique_reply_rank: int | None) -> _Call:
        if unique_reply_rank is not None and not 0 <= unique_reply_rank < self.world_size:
            raise ValueError(f"unique_reply_rank={unique_reply_rank} is not a rank of this "
                             f"executor (world size {self.world_size})")
        expect = list(range(self.world_size)) if unique_reply_rank is None else [
            unique_reply_rank]
        message: bytes | ray.ObjectRef = rpc.make_request(
            next(self._call_ids), method, args, kwargs,
            -1 if unique_reply_rank is None else unique_reply_rank)
        if len(message) > _PUT_THRESHOLD_BYTES:
            message = ray.put(message)
        return _Call(method, [w.execute_method.remote(message) for w in self.workers], expect)


    def _resolve(self, call: _Call, timeout: float | None, return_exceptions: bool) -> None:
        """Waits until `call` is complete, fails, or times out."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not call.done():
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _ = ray.wait(list(call.pending), num_returns=1, timeout=remaining)
            if not ready:
                ranks = sorted(call.pending.values())
                raise CommunicationTimeoutError(
                    f"collective_rpc({_name(call.method)!r}) did not finish within {timeout} s "
                    f"on rank(s) {ranks}; they finish it before serving the next call")
            self._take(call, ready)
        if call.error is not None and not isinstance(call.error, WorkerCrashedError):
            self._crash_behind(call)
        if call.error is not None and not return_exceptions:
            raise call.error

    def _poll_call(self, call: _Call) -> None:
        if call.pending:
            ready, _ = ray.wait(list(call.pending), num_returns=len(call.pending), timeout=0)
            self._take(call, ready)

    def _take(self, call: _Call, refs: list[ray.ObjectRef]) -> None:
        with self._lock:  # two futures of one call may be resolved from two threads
            for ref in refs:
                rank = call.pending.pop(ref, None)
                if rank is None:
                    continue
                try:
                    data = ray.get(ref)
                except RayActorError as e:
                    crash = self._declare_failure(rank, e)
                    call.results.setdefault(rank, crash)
                    call.error = crash  # the call cannot finish without this rank
                    continue
                if not data:  # a rank that is not the reply rank finished fine
                    continue
                resp = rpc.decode_response(data)
                if resp.error is not None:
                    error = rpc.rebuild_error(resp.error, rank)
                    if rank in call.expect:
                        call.results[rank] = error
                    if rank not in call.expect or len(call.expect) == 1:
                        call.error = error  # a non-replying rank failed: the call cannot finish
                    continue
                call.results[rank] = rpc.unpack_result(resp, self.worker_cls, call.method)

    def _crash_behind(self, call: _Call) -> None:
        """A peer's death usually reaches a surviving rank first as a communication error;
        if one of the ranks still running this call turns out dead, report the crash."""
        if not call.pending:
            return
        ready, _ = ray.wait(list(call.pending), num_returns=len(call.pending),
                            timeout=CRASH_GRACE_S)
        self._take(call, ready)

    # ---- health and shutdown ----------------------------------------------------------
    def check_health(self) -> None:
        self._check_usable()
        call = self._submit("check_health", (), {}, None)
        try:
            self._resolve(call, HEALTH_TIMEOUT_S, return_exceptions=False)
        except CommunicationTimeoutError as e:
            raise WorkerCrashedError(
                f"worker rank(s) {sorted(call.pending.values())} did not answer a health check "
                f"within {HEALTH_TIMEOUT_S:.0f} s") from e

    @property
    def max_concurrent_batches(self) -> int:
        # Async scheduling (one worker only) keeps step N+1 queued behind step N on the actor.
        if self.scheduler_config.async_scheduling:
            return 2
        return self.parallel_config.pipeline_parallel_size

    def shutdown(self) -> None:
        if getattr(self, "_closed", True):
            return
        graceful = self._ready and self._failure is None and ray.is_initialized()
        self._closed = True
        # Each step on its own: one failing must not skip the rest. Without a session (a
        # ray.shutdown() elsewhere) the actors and the group went with it, and a Ray call
        # would start a new session.
        steps: list[Callable[[], Any]] = [lambda: self._stop_workers(graceful)]
        if self._own_pg is not None and ray.is_initialized():
            steps.append(lambda: remove_placement_group(self._own_pg))
        if self._started_ray:
            steps.append(ray.shutdown)
        for step in steps:
            try:
                step()
            except Exception:
                logger.debug("shutdown step failed", exc_info=True)
        atexit.unregister(self.shutdown)

    def _stop_workers(self, graceful: bool) -> None:
        if graceful:
            # Lets each worker stop its profiler and free its caches before it is killed.
            call = self._submit("shutdown", (), {}, None)
            try:
                self._resolve(call, 2.0, return_exceptions=True)
            except CommunicationTimeoutError:
                logger.warning("workers did not finish shutdown() within 2 s; killing them")
        if ray.is_initialized():
            for worker in self.workers:
                ray.kill(worker, no_restart=True)
            if self._sentinels:  # they resolve once Ray has taken the actors down
                ray.wait(self._sentinels, num_returns=len(self._sentinels), timeout=10)
        # A failure callback may shut the executor down from the monitor thread itself.
        if self._monitor not in (None, threading.current_thread()):
            self._monitor.join(2.0)
        _, alive = psutil.wait_procs(self._local_procs, timeout=5)
        if alive:
            logger.warning("Ray worker pids %s outlived their actors", [p.pid for p in alive])
        self.workers = []


def _get_at_startup(refs: list[ray.ObjectRef]) -> list[Any]:
    try:
        return ray.get(refs, timeout=STARTUP_TIMEOUT_S)
    except GetTimeoutError:
        raise WorkerCrashedError(
            f"the Ray workers did not start within {STARTUP_TIMEOUT_S:.0f} s") from None
    except RayActorError as e:
        raise WorkerCrashedError(f"a Ray worker failed to start: {e}") from e


def _name(method: Any) -> str:
    return getattr(method, "__name__", str(method))
