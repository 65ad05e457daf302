"""Starting, watching and stopping engine-core processes (the engine-process-utils surface)."""

from __future__ import annotations

import enum
import logging
import multiprocessing
import os
import tempfile
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
from fleetllm.engine.core_proc import EngineCoreProc
from fleetllm.engine.messages import EngineHandshakeMetadata, EngineZmqAddresses, HandshakeStatus

logger = logging.getLogger(__name__)

STARTUP_POLL_PERIOD_MS = 10_000
STARTUP_TIMEOUT_S = 600.0
DATA_PARALLEL_BACKENDS = ("mp", "ray")


def get_engine_client_zmq_addr(local_only: bool, host: str = "127.0.0.1", port: int = 0) -> str:
    """An ipc:// path for engines on this machine; tcp only for remote ones."""
    if local_only:
        return f"ipc://{tempfile.gettempdir()}/fleetllm-{os.getpid()}-{os.urandom(6).hex()}"
    if port == 0:
        import socket

        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
    return f"tcp://{host}:{port}"


class CoreEngineState(enum.Enum):
    NEW = enum.auto()
    CONNECTED = enum.auto()
    READY = enum.auto()


class CoreEngine:
    """One engine core as the front end tracks it during start-up."""

    def __init__(self, index: int = 0, local: bool = True) -> None:
        self.index = index
        self.local = local
        self.identity = index.to_bytes(2, "little")
        self.state = CoreEngineState.NEW


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

    def sentinels(self) -> list[int]:
        """File descriptors that turn readable when an engine core ends."""
        ...

    def finished_procs(self) -> dict[str, int]:
        """Name -> exit code of each engine core that has ended."""
        ...

    def join_first(self) -> None:
        """Waits until some engine core has ended."""
        ...

    def wait_for_exit(self, timeout: float) -> None:
        """Gives engines that were asked to stop up to timeout seconds to do so."""
        ...

    def close(self) -> None: ...


@dataclass
class EngineConnection:
    """What a client needs to attach to running engines: the addresses (it binds
    inputs[client_index] and outputs[client_index]), how many engines, and, in an API
    server process, the pipe on which the supervisor reports engine deaths."""

    addresses: EngineZmqAddresses
    client_index: int
    num_engines: int
    num_gpu_blocks: int = 0
    supervisor: Connection | None = None


class SupervisorLink:
    """An EngineManager for engines someone else owns. The supervisor sends the finished
    engines (name -> exit code) down the pipe when one dies; if the supervisor itself dies,
    the pipe reads as closed. Either way the pipe turns readable, like a process sentinel."""

    def __init__(self, conn: Connection | None) -> None:
        self.conn = conn
        self._finished: dict[str, int] = {}

    def sentinels(self) -> list[int]:
        return [] if self.conn is None or self.conn.closed else [self.conn.fileno()]

    def finished_procs(self) -> dict[str, int]:
        if self._finished or self.conn is None or self.conn.closed or not self.conn.poll():
            return dict(self._finished)
        try:
            self._finished = msgspec.json.decode(self.conn.recv_bytes(), type=dict[str, int])
        except (EOFError, OSError):
            self._finished = {"the supervisor (parent) process": -1}
        return dict(self._finished)

    def join_first(self) -> None:
        if self.conn is not None:
            connection.wait([self.conn])

    def wait_for_exit(self, timeout: float) -> None:
        pass  # not ours to stop

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


def wait_for_finished(manager: EngineManager, timeout: float = 1.0) -> dict[str, int]:
    """finished_procs() once non-empty: a sentinel turns readable as a process ends, a
    moment before its exit code can be read. Empty if nothing ended within timeout."""
    deadline = time.monotonic() + timeout
    while not (done := manager.finished_procs()) and time.monotonic() < deadline:
        time.sleep(0.01)
    return done


class CoreEngineProcManager:
    """Creates the local engine-core processes, watches them, and shuts them down."""

    def __init__(self, target_fn: Callable[..., Any], local_engine_count: int, start_index: int,
                 local_start_index: int, config: EngineConfig, handshake_address: str,
                 data_parallel_size: int | None = None) -> None:
        data_parallel_size = data_parallel_size or local_engine_count
        ctx = multiprocessing.get_context("spawn")
        self.processes: list[BaseProcess] = []
        for i in range(local_engine_count):
            self.processes.append(ctx.Process(
                target=target_fn, name=f"EngineCore_{start_index + i}", daemon=False,
                kwargs={"config": config, "handshake_address": handshake_address,
                        "dp_rank": start_index + i, "local_dp_rank": local_start_index + i,
                        "data_parallel_size": data_parallel_size}))
        self._finalizer = weakref.finalize(self, shutdown, self.processes)
        try:
            for proc in self.processes:
                proc.start()
        finally:
            if self.finished_procs():
                self.close()

    def close(self) -> None:
        self._finalizer()

    def wait_for_exit(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for proc in self.processes:
            proc.join(max(0.0, deadline - time.monotonic()))

    def join_first(self) -> None:
        connection.wait([proc.sentinel for proc in self.processes])

    def sentinels(self) -> list[int]:
        return [proc.sentinel for proc in self.processes]

    def finished_procs(self) -> dict[str, int]:
        return {p.name: p.exitcode for p in self.processes if p.exitcode is not None}


def wait_for_engine_startup(handshake_socket: zmq.Socket, addresses: EngineZmqAddresses,
                            core_engines: list[CoreEngine], config: EngineConfig,
                            proc_manager: EngineManager | None,
                            timeout_s: float = STARTUP_TIMEOUT_S) -> int:
    """Runs the HELLO / metadata / READY handshake with every engine; returns the summed
    number of KV blocks. Fails at once, with exit codes, if an engine process dies."""
    poller = zmq.Poller()
    poller.register(handshake_socket, zmq.POLLIN)
    for sentinel in proc_manager.sentinels() if proc_manager else []:
        poller.register(sentinel, zmq.POLLIN)
    by_identity = {e.identity: e for e in core_engines}
    deadline = time.monotonic() + timeout_s
    total_blocks = 0
    errors: dict[int, str] = {}
    while any(e.state != CoreEngineState.READY for e in core_engines):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            waiting = [e.index for e in core_engines if e.state != CoreEngineState.READY]
            raise RuntimeError(f"engine core(s) {waiting} did not start within {timeout_s:.0f} s")
        events = dict(poller.poll(min(STARTUP_POLL_PERIOD_MS, int(remaining * 1000) + 1)))
        if handshake_socket in events:
            identity, raw = handshake_socket.recv_multipart()
            engine = by_identity.get(identity)
            if engine is None:
                raise RuntimeError(f"handshake from an unknown engine {identity!r}")
            msg = msgspec.msgpack.decode(raw, type=HandshakeStatus)
            if msg.status == "FAILED":
                errors[engine.index] = msg.error or "unknown error"
            elif msg.status == "HELLO" and engine.state == CoreEngineState.NEW:
                meta = EngineHandshakeMetadata(addresses, {
                    "data_parallel_size": len(core_engines), "data_parallel_rank": engine.index})
                handshake_socket.send_multipart([identity, msgspec.msgpack.encode(meta)])
                engine.state = CoreEngineState.CONNECTED
            elif msg.status == "READY" and engine.state == CoreEngineState.CONNECTED:
                total_blocks += msg.num_gpu_blocks
                engine.state = CoreEngineState.READY
            else:
                raise RuntimeError(f"unexpected {msg.status} from engine {engine.index} in "
                                   f"state {engine.state.name}")
        finished = proc_manager.finished_procs() if proc_manager else {}
        if finished or errors:
            if proc_manager is not None and errors and not finished:
                proc_manager.join_first()
                finished = proc_manager.finished_procs()
            detail = "; ".join(f"engine {i}: {err}" for i, err in errors.items())
            raise RuntimeError(f"engine core start-up failed ({detail or 'see the log above'}); "
                               f"exit codes: {finished}")
    return total_blocks


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
    addresses = EngineZmqAddresses(
        [get_engine_client_zmq_addr(local_only, host) for _ in range(num_clients)],
        [get_engine_client_zmq_addr(local_only, host) for _ in range(num_clients)])
    handshake_address = get_engine_client_zmq_addr(local_only, host)
    ctx = zmq.Context()
    handshake = ctx.socket(zmq.ROUTER)
    handshake.setsockopt(zmq.LINGER, 0)
    manager: EngineManager | None = None
    try:
        handshake.bind(handshake_address)
        if backend == "ray":
            from fleetllm.engine.ray_engines import CoreEngineActorManager

            manager = CoreEngineActorManager(config, data_parallel_size, handshake_address,
                                             owns_ray)
        else:
            manager = CoreEngineProcManager(EngineCoreProc.run_engine_core, data_parallel_size,
                                            0, 0, config, handshake_address)
        engines = [CoreEngine(i) for i in range(data_parallel_size)]
        blocks = wait_for_engine_startup(handshake, addresses, engines, config, manager,
                                         timeout_s)
    except BaseException:
        if manager is not None:
            manager.close()
        elif owns_ray:
            import ray

            ray.shutdown()
        raise
    finally:
        ctx.destroy(linger=0)
        unlink_ipc(handshake_address)
    return manager, addresses, blocks


def unlink_ipc(*addresses: str) -> None:
    for address in addresses:
        if address.startswith("ipc://"):
            try:
                os.unlink(address[len("ipc://"):])
            except FileNotFoundError:
                pass
