"""Starting, watching, restarting and stopping engine-core processes (the
engine-process-utils surface).

After start-up, whoever owns the engines (a front end, or the supervisor of several API
servers) learns of their deaths and restarts as EngineEvents from its manager: a dead
engine is replaced in the background, within the restart budget, by a new one for the same
index, through the same handshake with the same client addresses.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import connection
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, Protocol

import msgspec
import psutil
import zmq

from fleetllm.config import EngineConfig
from fleetllm.engine.coordinator import CoordinatorManager, coordinator_addresses
from fleetllm.engine.core_proc import EngineCoreProc
from fleetllm.engine.handshake import (
    STARTUP_TIMEOUT_S,
    CoreEngine,
    get_engine_client_zmq_addr,
    unlink_ipc,
    wait_for_engine_startup,
)
from fleetllm.engine.messages import (
    EngineEvent,
    EngineZmqAddresses,
)
from fleetllm.engine.restart import EXIT_CODE_WAIT_S, EngineState, EventQueue, RestartingManager

logger = logging.getLogger(__name__)

DATA_PARALLEL_BACKENDS = ("mp", "ray")


def shutdown(procs: list[BaseProcess]) -> None:
    """Terminate, wait up to 5 s, then kill whatever is left (with its children)."""
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    deadline = time.monotonic() + 5
    for proc in procs:
        remaining = deadline - time.monotonic()
        if remaining > 0 and proc.is_alive():
            proc.join(remaining)
    for proc in procs:
        if proc.is_alive() and proc.pid is not None:
            kill_process_tree(proc.pid)
            proc.join(1)


def kill_process_tree(pid: int) -> None:
    try:
        parent = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    for child in parent.children(recursive=True) + [parent]:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass


class EngineManager(Protocol):
    """What front ends and the supervisor need of whatever runs the engine cores."""

    def events_fd(self) -> int | None:
        """A file descriptor that polls readable while take_events() has something."""
        ...

    def take_events(self) -> list[EngineEvent]:
        """Deaths and restarts since the last call, in order."""
        ...

    def begin_shutdown(self) -> None:
        """The engines are about to be told to stop: their ends are no longer deaths."""
        ...

    def wait_for_exit(self, timeout: float) -> None:
        """Gives engines that were asked to stop up to timeout seconds to do so."""
        ...

    def close(self) -> None: ...


@dataclass
class EngineConnection:
    """What a client needs to attach to running engines: the addresses (it binds
    inputs[client_index] and outputs[client_index]), how many engines, and, in an API
    server process, the pipe on which the supervisor reports engine events."""

    addresses: EngineZmqAddresses
    client_index: int
    num_engines: int
    num_gpu_blocks: int = 0
    supervisor: Connection | None = None


class SupervisorLink:
    """An EngineManager for engines someone else owns. The supervisor sends each
    EngineEvent down the pipe; if the supervisor itself dies, the pipe reads as closed,
    which counts as the final death of every engine."""

    def __init__(self, conn: Connection | None) -> None:
        self.conn = conn
        self._gone = False
        self._decoder = msgspec.msgpack.Decoder(EngineEvent)

    def events_fd(self) -> int | None:
        if self.conn is None or self.conn.closed or self._gone:
            return None
        return self.conn.fileno()

    def take_events(self) -> list[EngineEvent]:
        events: list[EngineEvent] = []
        if self.events_fd() is None:
            return events
        try:
            while self.conn.poll():
                events.append(self._decoder.decode(self.conn.recv_bytes()))
        except (EOFError, OSError):
            self._gone = True
            events.append(EngineEvent("dead", -1, "the supervisor (parent) process is gone"))
        return events

    def begin_shutdown(self) -> None:
        pass  # not ours to stop

    def wait_for_exit(self, timeout: float) -> None:
        pass

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


class CoreEngineProcManager(RestartingManager):
    """Creates the local engine-core processes, watches them (and, once start_recovery was
    called, restarts dead ones), and shuts them down."""

    def __init__(self, target_fn: Callable[..., Any], local_engine_count: int, start_index: int,
                 local_start_index: int, config: EngineConfig, handshake_address: str,
                 data_parallel_size: int | None = None) -> None:
        self._ctx = multiprocessing.get_context("spawn")
        self._target_fn = target_fn
        self._start_index, self._local_start_index = start_index, local_start_index
        self._dp = data_parallel_size or local_engine_count
        self._init_recovery(config, range(start_index, start_index + local_engine_count),
                            self._dp)
        self._wake_r, self._wake_w = os.pipe()
        self._watcher: threading.Thread | None = None
        self.processes: list[BaseProcess] = [
            self._new_process(index, handshake_address) for index in self._indexes]
        self._finalizer = weakref.finalize(self, _stop_processes, self.processes,
                                           self._events, [self._wake_r, self._wake_w])
        try:
            for proc in self.processes:
                proc.start()
        finally:
            if self.finished_procs():
                self.close()

    def _new_process(self, index: int, handshake_address: str) -> BaseProcess:
        return self._ctx.Process(
            target=self._target_fn, name=self.engine_name(index), daemon=False,
            kwargs={"config": self._config, "handshake_address": handshake_address,
                    "dp_rank": index,
                    "local_dp_rank": self._local_start_index + index - self._start_index,
                    "data_parallel_size": self._dp})

    def _process(self, index: int) -> BaseProcess:
        return self.processes[index - self._start_index]

    def _spawn(self, index: int, handshake_address: str) -> None:
        self._dp = self._data_parallel_size  # a scale-up's engines start with the new size
        proc = self._new_process(index, handshake_address)
        proc.start()
        slot = index - self._start_index
        if slot == len(self.processes):
            self.processes.append(proc)  # a scale-up's new engine
        else:
            self.processes[slot] = proc

    def _forget(self, index: int) -> None:
        slot = index - self._start_index
        if slot < len(self.processes):
            proc = self.processes.pop(slot)
            shutdown([proc])

    def start_recovery(self, addresses: EngineZmqAddresses, host: str = "127.0.0.1") -> None:
        super().start_recovery(addresses, host)
        self._watcher = threading.Thread(target=self._watch, daemon=True,
                                         name="fleetllm-engine-watch")
        self._watcher.start()

    def _watch_new_engines(self) -> None:
        os.write(self._wake_w, b"x")

    def _watch(self) -> None:
        """Reports each watched process's end once; wakes up for new processes and close."""
        while True:
            with self._lock:
                if self._closing:
                    return
                watched = {self._process(i).sentinel: (i, self._process(i))
                           for i in self._indexes if self._states[i] is not EngineState.DEAD}
            ready = connection.wait([*watched, self._wake_r])
            if self._wake_r in ready:
                os.read(self._wake_r, 4096)
            for sentinel in ready:
                if sentinel in watched:
                    index, proc = watched[sentinel]
                    proc.join(EXIT_CODE_WAIT_S)
                    code = -1 if proc.exitcode is None else proc.exitcode
                    self._engine_ended(index, code,
                                       f"{proc.name} exited with code {code}")

    def close(self) -> None:
        if not self._finalizer.alive:
            return
        self.begin_shutdown()
        os.write(self._wake_w, b"x")
        if self._watcher is not None:
            self._watcher.join()
        self._finalizer()
        self._close_coordinator()

    def wait_for_exit(self, timeout: float) -> None:
        """Engines still starting would not stop by themselves: close() ends them."""
        deadline = time.monotonic() + timeout
        for index in self._running():
            self._process(index).join(max(0.0, deadline - time.monotonic()))

    def join_first(self) -> None:
        connection.wait([proc.sentinel for proc in self.processes])

    def sentinels(self) -> list[int]:
        return [proc.sentinel for proc in self.processes]

    def finished_procs(self) -> dict[str, int]:
        return {p.name: p.exitcode for p in self.processes if p.exitcode is not None}


def _stop_processes(processes: list[BaseProcess], events: EventQueue, fds: list[int]) -> None:
    shutdown(processes)
    events.close()
    for fd in fds:
        os.close(fd)


def launch_core_engines(config: EngineConfig, data_parallel_size: int = 1,
                        backend: str = "mp", num_clients: int = 1,
                        timeout_s: float = STARTUP_TIMEOUT_S
                        ) -> tuple[EngineManager, EngineZmqAddresses, int]:
    """Starts the engine cores (processes, or Ray actors) and runs the start-up handshake.

    Returns the manager, the addresses each client must bind (inputs[i] and outputs[i] for
    client i; the engines connect to them, so clients may bind later), and the KV blocks
    of all engines together."""
    if backend not in DATA_PARALLEL_BACKENDS:
        raise ValueError(f"data_parallel_backend={backend!r}; choose one of "
                         f"{', '.join(DATA_PARALLEL_BACKENDS)}")
    if data_parallel_size < 1:
        raise ValueError(f"data_parallel_size={data_parallel_size} must be >= 1")
    owns_ray = False
    host = "127.0.0.1"
    if backend == "ray":
        from fleetllm.engine.ray_engines import ensure_ray, ray_node_address

        owns_ray = ensure_ray(config, data_parallel_size)
        host = ray_node_address()
    local_only = host == "127.0.0.1"
    # Engines on this node use ipc; with several nodes, the client sockets also listen on
    # TCP for the engines elsewhere (and the handshake, which every engine reaches, is TCP).
    addresses = EngineZmqAddresses(
        [get_engine_client_zmq_addr(True) for _ in range(num_clients)],
        [get_engine_client_zmq_addr(True) for _ in range(num_clients)])
    if not local_only:
        addresses.remote_inputs = [get_engine_client_zmq_addr(False, host)
                                   for _ in range(num_clients)]
        addresses.remote_outputs = [get_engine_client_zmq_addr(False, host)
                                    for _ in range(num_clients)]
    handshake_address = get_engine_client_zmq_addr(local_only, host)
    coordinator = None
    if data_parallel_size > 1:
        addresses.coordinator_input, addresses.coordinator_output = coordinator_addresses(
            local_only, host)
        coordinator = CoordinatorManager(addresses.coordinator_input,
                                         addresses.coordinator_output, data_parallel_size)
    ctx = zmq.Context()
    handshake = ctx.socket(zmq.ROUTER)
    handshake.setsockopt(zmq.LINGER, 0)
    manager: RestartingManager | None = None
    try:
        handshake.bind(handshake_address)
        if backend == "ray":
            from fleetllm.engine.ray_engines import CoreEngineActorManager

            manager = CoreEngineActorManager(config, data_parallel_size, handshake_address,
                                             owns_ray)
        else:
            manager = CoreEngineProcManager(EngineCoreProc.run_engine_core, data_parallel_size,
                                            0, 0, config, handshake_address)
        manager.coordinator = coordinator
        engines = [CoreEngine(i) for i in range(data_parallel_size)]
        blocks = wait_for_engine_startup(handshake, addresses, engines, config, manager,
                                         timeout_s, remote=manager.remote_engines())
        manager.start_recovery(addresses, host)
    except BaseException:
        if manager is not None:
            manager.close()
        elif coordinator is not None:
            coordinator.close()
        if manager is None and owns_ray:
            import ray

            ray.shutdown()
        raise
    finally:
        ctx.destroy(linger=0)
        unlink_ipc(handshake_address)
    return manager, addresses, blocks
