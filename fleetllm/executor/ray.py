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
import logging
import math
import os
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from typing import Any

import psutil
import torch

from fleetllm.config import EngineConfig
from fleetllm.errors import CommunicationTimeoutError, ConfigurationError, WorkerCrashedError
from fleetllm.executor import rpc
from fleetllm.executor.abstract import WorkerGroupExecutor
from fleetllm.executor.calls import CallTable, Reply
from fleetllm.executor.futures import FutureWrapper  # noqa: F401 - the reference's name
from fleetllm.executor.multiproc import WORKER_CLS, get_open_port
from fleetllm.executor.ray_placement import create_groups
from fleetllm.worker.worker_base import WorkerWrapperBase, resolve_obj_by_qualname

try:
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError
    from ray.util.placement_group import (
        PlacementGroup,
        get_current_placement_group,
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


class _RayWorkerGroup:
    """One generation of worker actors: the Ray transport of the call table. Each call is
    one execute_method reference per rank; restart_failed_workers kills a group's actors
    and starts the next group in the same placement group."""

    spin_s = 0.0  # ray.wait sleeps in Ray's own loop

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.workers: list[ray.actor.ActorHandle] = []
        self.pids: list[int] = []
        self.sentinels: list[ray.ObjectRef] = []
        self.local_procs: list[psutil.Process] = []
        self.pending: dict[ray.ObjectRef, int] = {}  # reference -> rank
        self.monitor: threading.Thread | None = None
        self.closed = False

    # ---- the transport ----------------------------------------------------------------
    def send(self, call_id: int, message: bytes, timeout: float | None,
             dead: set[int]) -> None:
        payload: bytes | ray.ObjectRef = message
        if len(message) > _PUT_THRESHOLD_BYTES:
            payload = ray.put(message)
        for rank, worker in enumerate(self.workers):
            if rank not in dead:
                self.pending[worker.execute_method.remote(payload)] = rank

    def drain(self) -> list[Reply]:
        if not self.pending:
            return []
        ready, _ = ray.wait(list(self.pending), num_returns=len(self.pending), timeout=0)
        replies = []
        for ref in ready:
            rank = self.pending.pop(ref)
            try:
                replies.append(Reply(rank, ray.get(ref)))
            except RayActorError as e:
                replies.append(Reply(rank, died=_why(e)))
        return replies

    def sleep(self, timeout: float) -> None:
        if self.pending:
            ray.wait(list(self.pending), num_returns=1, timeout=timeout)
        else:
            time.sleep(timeout)

    def wake(self) -> None:
        pass  # sleep() is bounded by the call table's MAX_SLEEP_S

    # ---- start and stop ---------------------------------------------------------------
    def start(self, config: EngineConfig, slots: list[tuple[PlacementGroup, int]],
              table: CallTable, on_cuda: bool) -> None:
        """slots: each rank's (placement group, bundle index)."""
        omp = os.environ.get("OMP_NUM_THREADS", "")
        omp_threads = int(omp) if omp.isdigit() and int(omp) > 0 else None
        for rank, (pg, index) in enumerate(slots):
            bundle = pg.bundle_specs[index]
            if on_cuda and bundle.get("GPU", 0) < 1:
                raise ConfigurationError(
                    f"bundle {index} of the current placement group has no GPU: {bundle}")
            strategy = PlacementGroupSchedulingStrategy(
                placement_group=pg, placement_group_bundle_index=index,
                placement_group_capture_child_tasks=True)
            actor = RayWorkerWrapper.options(
                num_cpus=0 if on_cuda else min(CPUS_PER_WORKER, bundle.get("CPU", 0)),
                num_gpus=1 if on_cuda else 0,
                scheduling_strategy=strategy,
            ).remote(rank, WORKER_CLS, omp_threads)
            self.workers.append(actor)
        infos = _get_at_startup([w.node_info.remote() for w in self.workers])
        self.pids = [pid for _, _, pid, _ in infos]
        # The sentinels go out first, so a death while loading the model is noticed too.
        self.sentinels = [w.sentinel.remote() for w in self.workers]
        # The monitor holds the group and the table, never the executor.
        self.monitor = threading.Thread(target=_monitor_workers, args=(self, table),
                                        daemon=True, name="fleetllm-ray-monitor")
        self.monitor.start()
        here = ray.get_runtime_context().get_node_id()
        self.local_procs = [psutil.Process(pid) for node, _, pid, _ in infos if node == here]
        node0, ip0, _, port = infos[0]
        # Loopback when every rank shares one node: it always works and needs no interface.
        host = "127.0.0.1" if all(node == node0 for node, *_ in infos) else ip0
        init_method = f"tcp://{host}:{port}"
        # Ray makes an actor's own GPU its only visible device, so on CUDA it is device 0.
        _get_at_startup([w.init_worker.remote(config, 0 if on_cuda else rank, init_method)
                         for rank, w in enumerate(self.workers)])
        logger.info("started %d Ray workers (pids %s), rendezvous at %s", self.world_size,
                    self.pids, init_method)

    def close(self, graceful: bool, table: CallTable | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        if graceful and table is not None and ray.is_initialized():
            # Lets each worker stop its profiler and free its caches before it is killed.
            try:
                table.collective_rpc("shutdown", 2.0, (), None, False, True, None)
            except Exception:
                logger.warning("workers did not finish shutdown() within 2 s; killing them")
        if ray.is_initialized():
            for worker in self.workers:
                ray.kill(worker, no_restart=True)
            if self.sentinels:  # they resolve once Ray has taken the actors down
                ray.wait(self.sentinels, num_returns=len(self.sentinels), timeout=10)
        # A failure callback may shut the executor down from the monitor thread itself.
        if self.monitor not in (None, threading.current_thread()):
            self.monitor.join(2.0)
        _, alive = psutil.wait_procs(self.local_procs, timeout=5)
        if alive:
            logger.warning("Ray worker pids %s outlived their actors", [p.pid for p in alive])
        self.workers, self.pending = [], {}


def _monitor_workers(group: _RayWorkerGroup, table: CallTable) -> None:
    """Turns an actor's death (its sentinel resolving) into the table's crash signal."""
    ranks = {ref: rank for rank, ref in enumerate(group.sentinels)}
    while not group.closed:
        try:
            # The timeout only bounds how long shutdown waits for this thread.
            ready, _ = _wait_no_autostart(list(ranks), num_returns=1, timeout=1.0)
        except BaseException as e:
            # Ray itself is gone, and the actors with it: a ray.shutdown() elsewhere ends
            # a blocked wait with SystemExit, and a later one fails.
            if not group.closed:
                table.fail(WorkerCrashedError(f"the Ray session ended ({e!r}); "
                                              "ray.shutdown() was called"))
            return
        if not ready or group.closed:
            continue
        rank = ranks.pop(ready[0])
        if not ray.is_initialized():  # a ray.shutdown() elsewhere took the actors down
            table.fail(WorkerCrashedError("the Ray session ended: ray.shutdown() was called"))
            return
        try:
            _get_no_autostart(ready[0])
            why = "its sentinel returned"
        except BaseException as e:
            why = _why(e)
        pid = group.pids[rank] if rank < len(group.pids) else "?"
        table.rank_died(rank, f"(Ray actor pid {pid}) died ({why})")
        if not ranks:
            return


def _why(error: BaseException) -> str:
    # Ray's last line says why ("...because it was killed by `ray.kill`"); its full text
    # would repeat the whole actor description.
    return str(error).strip().splitlines()[-1].split(". ")[0].rstrip(".")


class RayDistributedExecutor(WorkerGroupExecutor):
    uses_ray = True

    def _init_executor(self) -> None:
        self.world_size = self.parallel_config.world_size
        self.worker_cls = resolve_obj_by_qualname(WORKER_CLS)
        # What the finalizer releases; it holds this dict, never the executor, so dropping
        # the executor frees its actors and placement group.
        self._owned: dict[str, Any] = {"groups": [], "pgs": [], "started_ray": False}
        self._finalizer = weakref.finalize(self, _release, self._owned, None)
        self.table = CallTable(_RayWorkerGroup(self.world_size), self.worker_cls)
        try:
            self._start_ray()
            # After ray.init, so at exit this runs before Ray's own atexit shutdown.
            atexit.register(self._finalizer)
            self._slots = self._placement_groups()
            self._start(self.table.transport)
        except BaseException:
            self.shutdown()
            raise

    @property
    def workers(self) -> list[ray.actor.ActorHandle]:
        return self.table.transport.workers

    @property
    def _pids(self) -> list[int]:
        return self.table.transport.pids

    @property
    def _own_pgs(self) -> list[PlacementGroup]:
        """The placement groups this executor created, one per pipeline stage (none: the
        caller's group is used)."""
        return self._owned["pgs"]

    def _start(self, group: _RayWorkerGroup) -> None:
        self._owned["groups"].append(group)
        group.start(self.config, self._slots, self.table, self._on_cuda)
        self.collective_rpc("init_device", timeout=STARTUP_TIMEOUT_S)
        self.collective_rpc("load_model", timeout=STARTUP_TIMEOUT_S)

    def _replace_workers(self) -> None:
        if not ray.is_initialized():  # a Ray call now would start a new, empty session
            raise WorkerCrashedError("the Ray session ended (ray.shutdown() was called); its "
                                     "workers cannot be restarted")
        old = self._owned["groups"].pop()
        old.close(graceful=False)
        group = _RayWorkerGroup(self.world_size)
        self.table.reset(group)
        self._start(group)

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
        self._owned["started_ray"] = True
        logger.info("started Ray in %.2f s", time.perf_counter() - start)

    def _placement_groups(self) -> list[tuple[PlacementGroup, int]]:
        """Each rank's (placement group, bundle). The caller's group (a driver running in
        one, as an engine actor or under Ray Serve) is used as it is; otherwise each
        pipeline stage's tensor-parallel ranks get one STRICT_PACK group, so a tp group
        never spans nodes while stages may (spread over nodes by ray_placement)."""
        pg = get_current_placement_group()
        if pg is not None:
            if len(pg.bundle_specs) < self.world_size:
                raise ConfigurationError(
                    f"the current Ray placement group has {len(pg.bundle_specs)} bundles, "
                    f"fewer than the {self.world_size} ranks (one bundle each) need")
            return [(pg, rank) for rank in range(self.world_size)]
        bundle = {"GPU": 1.0} if self._on_cuda else {"CPU": CPUS_PER_WORKER}
        pc = self.parallel_config
        tp = pc.tensor_parallel_size
        groups = create_groups(pc.pipeline_parallel_size, [bundle] * tp, pc.ray_placement,
                               f"fleetllm_stage_{uuid.uuid4().hex[:8]}_", PLACEMENT_TIMEOUT_S,
                               "pipeline stages (tensor-parallel groups)")
        self._owned["pgs"] = groups
        return [(groups[rank // tp], rank % tp) for rank in range(self.world_size)]

    @property
    def _on_cuda(self) -> bool:
        return self.device_config.device == "cuda"

    def _before_call(self) -> None:
        self._check_session()

    def _check_session(self) -> None:
        if not self.table.closed and not ray.is_initialized():
            # else .remote() would start a new session
            self.table.fail(WorkerCrashedError("the Ray session ended: ray.shutdown() was "
                                               "called"))

    # ---- health and shutdown ----------------------------------------------------------
    def check_health(self) -> None:
        self._check_session()
        call = self.table.submit("check_health", (), {}, None)
        try:
            self.table._resolve(call, HEALTH_TIMEOUT_S, return_exceptions=False)
        except CommunicationTimeoutError as e:
            self.table.forget(call)
            raise WorkerCrashedError(
                f"worker rank(s) {call.missing()} did not answer a health check within "
                f"{HEALTH_TIMEOUT_S:g} s") from e

    @property
    def max_concurrent_batches(self) -> int:
        # Async scheduling (one worker only) keeps step N+1 queued behind step N on the actor.
        if self.scheduler_config.async_scheduling:
            return 2
        return self.parallel_config.pipeline_parallel_size

    def shutdown(self) -> None:
        if not hasattr(self, "_finalizer") or not self._finalizer.alive:
            return
        table = getattr(self, "table", None)
        graceful = (table is not None and table.failure is None and not table.closed
                    and ray.is_initialized() and bool(table.transport.workers))
        if graceful:
            self._owned["groups"][-1].close(graceful=True, table=table)
        if table is not None:
            table.close()
        self._finalizer()
        atexit.unregister(self._finalizer)


def _release(owned: dict[str, Any], _: Any) -> None:
    """Each step on its own: one failing must not skip the rest. Without a session (a
    ray.shutdown() elsewhere) the actors and the group went with it, and a Ray call would
    start a new session."""
    steps: list[Callable[[], Any]] = [
        lambda g=g: g.close(graceful=False) for g in owned["groups"]]
    for pg in owned["pgs"]:
        steps.append(lambda pg=pg: ray.is_initialized() and remove_placement_group(pg))
    if owned["started_ray"]:
        steps.append(ray.shutdown)
    for step in steps:
        try:
            step()
        except Exception:
            logger.debug("shutdown step failed", exc_info=True)
    owned["groups"].clear()


def _get_at_startup(refs: list[ray.ObjectRef]) -> list[Any]:
    try:
        return ray.get(refs, timeout=STARTUP_TIMEOUT_S)
    except GetTimeoutError:
        raise WorkerCrashedError(
            f"the Ray workers did not start within {STARTUP_TIMEOUT_S:.0f} s") from None
    except RayActorError as e:
        raise WorkerCrashedError(f"a Ray worker failed to start: {e}") from e
