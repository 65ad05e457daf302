"""CoreEngineActorManager: the engine cores as Ray actors, for clusters.

Each data-parallel rank gets its own STRICT_PACK placement group of world-size bundles, so
an engine and its tp/pp workers land on one node. The engine actor runs the same busy loop
as an engine process, in a long-running `run` call; that call's ObjectRef ending is how a
dead engine is noticed (a pipe turns it into a file descriptor the start-up handshake can
poll like a process sentinel). A dead engine's replacement is a new actor in the same
placement group, started through the same handshake (RestartingManager).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import uuid
from typing import Any

import ray
from ray.exceptions import RayActorError
from ray.util.placement_group import PlacementGroup, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from fleetllm.config import EngineConfig
from fleetllm.engine.core_proc import EngineCoreProc
from fleetllm.engine.restart import EngineState, RestartingManager
from fleetllm.executor.ray import CPUS_PER_WORKER, PLACEMENT_TIMEOUT_S
from fleetllm.executor.ray_placement import create_groups, group_node

logger = logging.getLogger(__name__)

WATCH_PERIOD_S = 0.2


def ensure_ray(config: EngineConfig, data_parallel_size: int) -> bool:
    """Joins the current Ray session, or RAY_ADDRESS's cluster, or starts a local one (and
    returns True: the caller then owns it and shuts it down)."""
    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return False
    world = config.parallel_config.world_size
    cpus = max(os.cpu_count() or 1, math.ceil(data_parallel_size * world * CPUS_PER_WORKER))
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=True)
    return True


def ray_node_address() -> str:
    """127.0.0.1 (ipc sockets) on a one-node cluster; this node's IP when engines may run on
    other nodes and must reach the front end over TCP."""
    alive = [n for n in ray.nodes() if n.get("Alive")]
    return "127.0.0.1" if len(alive) <= 1 else ray.util.get_node_ip_address()


class EngineCoreActor:
    """One data-parallel engine core inside a Ray actor."""

    def __init__(self, config: EngineConfig, handshake_address: str, dp_rank: int,
                 data_parallel_size: int, omp_threads: str | None) -> None:
        # Ray exports OMP_NUM_THREADS=1 to its workers; use the driver's choice, or none.
        if omp_threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = omp_threads
        self.args = (config, handshake_address, dp_rank, dp_rank, data_parallel_size)

    def run(self) -> None:
        EngineCoreProc.run_engine_core(*self.args, in_actor=True)


class CoreEngineActorManager(RestartingManager):
    """Creates the engine-core actors, watches them (and, once start_recovery was called,
    restarts dead ones), and removes them (and their groups)."""

    engine_name_format = "EngineCoreActor_{}"

    def __init__(self, config: EngineConfig, data_parallel_size: int, handshake_address: str,
                 owns_ray: bool = False) -> None:
        self.owns_ray = owns_ray
        self.actors: list[Any] = []
        self.placement_groups: list[PlacementGroup] = []
        self.run_refs: list[ray.ObjectRef] = []
        self.errors: dict[str, str] = {}
        self._init_recovery(config, range(data_parallel_size), data_parallel_size)
        self._read_fd, self._write_fd = os.pipe()
        self._stop = threading.Event()
        self._closed = False
        self._watcher: threading.Thread | None = None
        self._tag = uuid.uuid4().hex[:8]
        self._here = ""  # the node id of this (the front end's) process
        self._actor_cls = ray.remote(EngineCoreActor)
        try:
            self._start(config, data_parallel_size, handshake_address)
        except BaseException:
            self.close()
            raise

    def _groups(self, count: int, first: int, timeout_s: float) -> list[PlacementGroup]:
        config = self._config
        bundle = {"GPU": 1.0} if config.device_config.device == "cuda" else {
            "CPU": CPUS_PER_WORKER}
        # One STRICT_PACK group per engine (it and its workers on one node); "spread"
        # gives each engine another node while there are nodes with room.
        return create_groups(
            count, [bundle] * config.parallel_config.world_size,
            config.parallel_config.ray_placement, f"fleetllm_dp_{self._tag}_{first}_",
            timeout_s, "data-parallel engines")

    def _start(self, config: EngineConfig, dp: int, handshake_address: str) -> None:
        self.placement_groups = self._groups(dp, 0, PLACEMENT_TIMEOUT_S)
        self._here = ray.get_runtime_context().get_node_id()
        for rank in range(dp):
            actor = self._new_actor(rank, handshake_address)
            self.actors.append(actor)
            self.run_refs.append(actor.run.remote())
        self._watcher = threading.Thread(target=self._watch, daemon=True,
                                         name="fleetllm-engine-actor-watch")
        self._watcher.start()

    def _new_actor(self, rank: int, handshake_address: str) -> Any:
        config = self._config
        cuda = config.device_config.device == "cuda"
        # A Ray executor inside the engine takes the group's bundles for its workers; any
        # other keeps its rank 0 in the engine actor, which then holds bundle 0.
        inner_ray = config.parallel_config.distributed_executor_backend == "ray"
        strategy = PlacementGroupSchedulingStrategy(
            placement_group=self.placement_groups[rank], placement_group_bundle_index=0,
            placement_group_capture_child_tasks=True)
        return self._actor_cls.options(
            name=f"fleetllm_EngineCore_{rank}_{self._tag}_{self._epochs[rank]}",
            num_cpus=0 if inner_ray or cuda else CPUS_PER_WORKER,
            num_gpus=0 if inner_ray or not cuda else 1,
            scheduling_strategy=strategy,
        ).remote(config, handshake_address, rank, self._data_parallel_size,
                 os.environ.get("OMP_NUM_THREADS"))

    def engine_nodes(self) -> list[str | None]:
        """The node id of each engine (of its placement group: after a node was lost,
        Ray may have moved the group)."""
        return [group_node(pg) for pg in self.placement_groups]

    def remote_engines(self) -> set[int]:
        return {i for i, node in enumerate(self.engine_nodes()) if node != self._here}

    def _spawn(self, index: int, handshake_address: str) -> None:
        """A new actor in the dead one's placement group (its bundle is free again), or,
        for a scale-up, in the group _prepare_new reserved."""
        actor = self._new_actor(index, handshake_address)
        if index == len(self.actors):
            self.actors.append(actor)
            self.run_refs.append(actor.run.remote())
        else:
            self.actors[index], self.run_refs[index] = actor, actor.run.remote()

    def _prepare_new(self, indexes: list[int], timeout_s: float) -> None:
        """Reserves a group for each new engine (on nodes that joined since, too); fails,
        reserving nothing, if the cluster has no room within timeout_s."""
        self.placement_groups.extend(self._groups(len(indexes), indexes[0], timeout_s))

    def _forget(self, index: int) -> None:
        if index < len(self.actors):
            try:
                ray.kill(self.actors.pop(index))
            except Exception:
                logger.debug("ray.kill failed", exc_info=True)
            self.run_refs.pop(index)
        if index < len(self.placement_groups):
            remove_placement_group(self.placement_groups.pop(index))

    def _watch(self) -> None:
        """Reports each watched actor's end once; picks up restarted actors' refs."""
        while not self._stop.is_set() and ray.is_initialized():
            with self._lock:
                watched = {self.run_refs[i]: i for i in self._indexes
                           if self._states[i] is not EngineState.DEAD}
            if not watched:
                self._stop.wait(WATCH_PERIOD_S)
                continue
            done, _ = ray.wait(list(watched), num_returns=1, timeout=WATCH_PERIOD_S)
            for ref in done:
                index = watched[ref]
                name = self.engine_name(index)
                try:
                    ray.get(ref)
                    code, detail = 0, f"{name} returned"
                except RayActorError as e:  # killed, or its process died
                    code, self.errors[name] = -9, str(e).splitlines()[0]
                    detail = f"{name} died: {self.errors[name]}"
                except Exception as e:  # run raised: the engine failed
                    code, self.errors[name] = 1, str(e).splitlines()[-1]
                    detail = f"{name} failed: {self.errors[name]}"
                self._engine_ended(index, code, detail)
                os.write(self._write_fd, b"x")

    # ---- the EngineManager surface ------------------------------------------------------
    def sentinels(self) -> list[int]:
        return [self._read_fd]

    def finished_procs(self) -> dict[str, int]:
        with self._lock:
            return {self.engine_name(i): code for i, (code, _) in self._ended.items()}

    def join_first(self) -> None:
        import select

        select.select([self._read_fd], [], [])

    def wait_for_exit(self, timeout: float) -> None:
        """After the engines were asked to stop: gives them up to timeout to do so (engines
        still starting would not stop by themselves: close() ends them)."""
        refs = [self.run_refs[i] for i in self._running()]
        if refs and ray.is_initialized():
            ray.wait(refs, num_returns=len(refs), timeout=timeout)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.begin_shutdown()
        self._close_coordinator()
        self._stop.set()
        if ray.is_initialized():
            for actor in self.actors:
                try:
                    ray.kill(actor)
                except Exception:
                    logger.debug("ray.kill failed", exc_info=True)
            for pg in self.placement_groups:
                try:
                    remove_placement_group(pg)
                except Exception:
                    logger.debug("remove_placement_group failed", exc_info=True)
        if self._watcher is not None:
            self._watcher.join()
        self._events.close()
        os.close(self._read_fd)
        os.close(self._write_fd)
        if self.owns_ray and ray.is_initialized():
            ray.shutdown()
