"""Starting, watching, restarting and stopping engine-core processes (the
engine-process-utils surface).

After start-up, whoever owns the engines (a front end, or the supervisor of several API
servers) learns of their deaths and restarts as EngineEvents from its manager: a dead
engine is replaced in the background, within the restart budget, by a new one for the same
index, through the same handshake with the same client addresses.
"""

from __future__ import annotations

import enum
import logging
import multiprocessing
import os
import tempfile
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import connection
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, Protocol

import msgspec
import psutil
import zmq

import fleetllm.config
from fleetllm.config import EngineConfig
from fleetllm.engine.core_proc import EngineCoreProc
from fleetllm.engine.messages import (
    EngineEvent,
    EngineHandshakeMetadata,
    EngineZmqAddresses,
    HandshakeStatus,
)

logger = logging.getLogger(__name__)

STARTUP_POLL_PERIOD_MS = 10_000
STARTUP_TIMEOUT_S = 600.0
RESTART_POLL_PERIOD_MS = 200  # how often a restart's handshake checks for a death or close
EXIT_CODE_WAIT_S = 1.0  # a sentinel turns readable a moment before the exit code is known
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


class StartingEngines(Protocol):
    """What the start-up handshake needs of whatever starts the engine cores."""

    def sentinels(self) -> list[int]:
        """File descriptors that turn readable when an engine core ends."""
        ...

    def finished_procs(self) -> dict[str, int]:
        """Name -> exit code of each engine core that has ended."""
        ...

    def join_first(self) -> None:
        """Waits until some engine core has ended."""
        ...


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


class EventQueue:
    """EngineEvents from background threads to the one thread that reads them; its pipe
    polls readable while some are waiting, so an event loop or poller can watch it."""

    def __init__(self) -> None:
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        self._events: list[EngineEvent] = []
        self._lock = threading.Lock()

    def fileno(self) -> int:
        return self._read_fd

    def put(self, event: EngineEvent) -> None:
        with self._lock:
            self._events.append(event)
            os.write(self._write_fd, b"x")

    def take(self) -> list[EngineEvent]:
        try:
            while os.read(self._read_fd, 4096):
                pass
        except BlockingIOError:
            pass  # drained; an event put after this still leaves the pipe readable
        with self._lock:
            events, self._events = self._events, []
        return events

    def close(self) -> None:
        os.close(self._read_fd)
        os.close(self._write_fd)


class RestartBudget:
    """At most max_restarts restarts per engine index within a sliding window."""

    def __init__(self, max_restarts: int, window_s: float | None = None) -> None:
        self.max_restarts = max_restarts
        self.window_s = fleetllm.config.RESTART_WINDOW_S if window_s is None else window_s
        self._times: dict[int, deque[float]] = {}

    def take(self, index: int) -> bool:
        """Spends one restart of engine index; False when none is left."""
        times = self._times.setdefault(index, deque())
        now = time.monotonic()
        while times and now - times[0] >= self.window_s:
            times.popleft()
        if len(times) >= self.max_restarts:
            return False
        times.append(now)
        return True

    def describe(self, index: int, allowed: bool) -> str:
        if self.max_restarts == 0:
            return "recovery is off (max_worker_restarts=0)"
        if allowed:
            return (f"restart {len(self._times[index])} of max_worker_restarts="
                    f"{self.max_restarts} within {self.window_s:.0f} s")
        return (f"its max_worker_restarts={self.max_restarts} restarts within "
                f"{self.window_s:.0f} s are used up; raise max_worker_restarts to allow more")


class EngineState(enum.Enum):
    STARTING = enum.auto()
    RUNNING = enum.auto()
    DEAD = enum.auto()


class RestartingManager:
    """Recovery shared by the process and actor managers. Subclasses start engines
    (`_spawn`) and report each end of a watched one (`_engine_ended`); engines in state
    DEAD are not watched. Indexes are data-parallel ranks."""

    engine_name_format = "EngineCore_{}"

    def _init_recovery(self, config: EngineConfig, indexes: range,
                       data_parallel_size: int) -> None:
        self._config = config
        self._indexes = indexes
        self._data_parallel_size = data_parallel_size
        self._lock = threading.Lock()
        self._events = EventQueue()
        self._states = dict.fromkeys(indexes, EngineState.STARTING)
        self._epochs = dict.fromkeys(indexes, 0)
        self._ended: dict[int, tuple[int, str]] = {}  # index -> (exit code, how)
        self._addresses: EngineZmqAddresses | None = None
        self._host = "127.0.0.1"
        self._budget = RestartBudget(config.parallel_config.max_worker_restarts)
        self._restart_threads: list[threading.Thread] = []
        self._closing = False

    def _spawn(self, index: int, handshake_address: str) -> None:
        """Starts a new engine for index in place of the dead one."""
        raise NotImplementedError

    def _watch_new_engines(self) -> None:
        """Called once an engine has been spawned (the watcher may need waking)."""

    def start_recovery(self, addresses: EngineZmqAddresses, host: str = "127.0.0.1") -> None:
        """After a successful start-up: engines that end from now on are reported, and
        restarted with these client addresses within the budget."""
        with self._lock:
            self._addresses, self._host = addresses, host
            for index in self._indexes:
                if self._states[index] is EngineState.STARTING:
                    self._states[index] = EngineState.RUNNING

    def engine_name(self, index: int) -> str:
        return self.engine_name_format.format(index)

    def events_fd(self) -> int | None:
        return self._events.fileno()

    def take_events(self) -> list[EngineEvent]:
        return self._events.take()

    def _engine_ended(self, index: int, code: int, detail: str) -> None:
        with self._lock:
            self._ended[index] = (code, detail)
            was, self._states[index] = self._states[index], EngineState.DEAD
            if self._closing or self._addresses is None or was is not EngineState.RUNNING:
                return  # start-up, a restart's own handshake, or shutdown: not an event
            restart = self._budget.take(index)
            budget = self._budget.describe(index, restart)
            if restart:
                logger.warning("engine core %d died (%s); restarting it (%s)", index, detail,
                               budget)
                thread = threading.Thread(target=self._restart, args=(index,), daemon=True,
                                          name=f"fleetllm-engine-restart-{index}")
                self._restart_threads = [t for t in self._restart_threads if t.is_alive()]
                self._restart_threads.append(thread)
                thread.start()
            else:
                logger.error("engine core %d died (%s); not restarting it: %s", index, detail,
                             budget)
                detail = f"{detail}; not restarted: {budget}"
            self._events.put(EngineEvent("dead", index, detail, restart, self._epochs[index]))

    def _restart(self, index: int) -> None:
        address = get_engine_client_zmq_addr(self._host == "127.0.0.1", self._host)
        ctx = zmq.Context()
        handshake = ctx.socket(zmq.ROUTER)
        handshake.setsockopt(zmq.LINGER, 0)
        try:
            handshake.bind(address)
            with self._lock:
                self._epochs[index] += 1
                epoch = self._epochs[index]
            self._spawn(index, address)  # meanwhile DEAD: the watcher leaves index alone
            with self._lock:
                if self._closing:
                    return  # close() stops what was spawned
                self._ended.pop(index, None)
                self._states[index] = EngineState.STARTING
            self._watch_new_engines()
            blocks = wait_for_engine_startup(
                handshake, self._addresses, [CoreEngine(index)], self._config,
                _RestartingEngine(self, index), data_parallel_size=self._data_parallel_size,
                epoch=epoch, poll_ms=RESTART_POLL_PERIOD_MS)
            with self._lock:
                if self._closing:
                    return
                if self._states[index] is not EngineState.STARTING:  # died right after READY
                    raise RuntimeError(self._ended.get(index, (0, "it ended"))[1])
                self._states[index] = EngineState.RUNNING
                logger.info("engine core %d restarted (%d KV blocks)", index, blocks)
                self._events.put(EngineEvent("ready", index, f"{blocks} KV blocks",
                                             epoch=epoch))
        except Exception as e:
            with self._lock:
                self._states[index] = EngineState.DEAD
                if self._closing:
                    return  # given up for the shutdown
                logger.error("restarting engine core %d failed: %s", index, e)
                self._events.put(EngineEvent("dead", index, f"restart failed: {e}"))
        finally:
            ctx.destroy(linger=0)
            unlink_ipc(address)

    def begin_shutdown(self) -> None:
        """No new restarts (the engines are told to stop next); the ones under way give
        up. Also the first step of close()."""
        with self._lock:
            self._closing = True
            threads = list(self._restart_threads)
        for thread in threads:
            thread.join()

    def _running(self) -> list[int]:
        with self._lock:
            return [i for i in self._indexes if self._states[i] is EngineState.RUNNING]


class _RestartingEngine:
    """wait_for_engine_startup's view of one engine being restarted: it ended when the
    manager's watcher said so; a manager that is closing ends the wait too."""

    def __init__(self, manager: RestartingManager, index: int) -> None:
        self.manager = manager
        self.index = index

    def sentinels(self) -> list[int]:
        return []  # the handshake polls finished_procs every RESTART_POLL_PERIOD_MS

    def finished_procs(self) -> dict[str, int]:
        m = self.manager
        with m._lock:
            if m._closing:
                return {"(the engines are shutting down)": 0}
            ended = m._ended.get(self.index)
        return {} if ended is None else {m.engine_name(self.index): ended[0]}

    def join_first(self) -> None:
        deadline = time.monotonic() + EXIT_CODE_WAIT_S
        while not self.finished_procs() and time.monotonic() < deadline:
            time.sleep(0.01)


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
        proc = self._new_process(index, handshake_address)
        proc.start()
        self.processes[index - self._start_index] = proc

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
                watched = {self._process(i).sentinel: i for i in self._indexes
                           if self._states[i] is not EngineState.DEAD}
            ready = connection.wait([*watched, self._wake_r])
            if self._wake_r in ready:
                os.read(self._wake_r, 4096)
            for sentinel in ready:
                if sentinel in watched:
                    proc = self._process(watched[sentinel])
                    proc.join(EXIT_CODE_WAIT_S)
                    code = -1 if proc.exitcode is None else proc.exitcode
                    self._engine_ended(watched[sentinel], code,
                                       f"{proc.name} exited with code {code}")

    def close(self) -> None:
        if not self._finalizer.alive:
            return
        self.begin_shutdown()
        os.write(self._wake_w, b"x")
        if self._watcher is not None:
            self._watcher.join()
        self._finalizer()

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


def wait_for_engine_startup(handshake_socket: zmq.Socket, addresses: EngineZmqAddresses,
                            core_engines: list[CoreEngine], config: EngineConfig,
                            proc_manager: StartingEngines | None,
                            timeout_s: float = STARTUP_TIMEOUT_S, *,
                            data_parallel_size: int | None = None, epoch: int = 0,
                            poll_ms: int = STARTUP_POLL_PERIOD_MS) -> int:
    """Runs the HELLO / metadata / READY handshake with every engine; returns the summed
    number of KV blocks. Fails at once, with exit codes, if an engine process dies.

    A restart runs it for one engine of data_parallel_size, whose outputs carry epoch."""
    dp = data_parallel_size or len(core_engines)
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
        events = dict(poller.poll(min(poll_ms, int(remaining * 1000) + 1)))
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
                    "data_parallel_size": dp, "data_parallel_rank": engine.index}, epoch)
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
        engines = [CoreEngine(i) for i in range(data_parallel_size)]
        blocks = wait_for_engine_startup(handshake, addresses, engines, config, manager,
                                         timeout_s)
        manager.start_recovery(addresses, host)
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
