"""Restarting engine cores that die: the recovery shared by the process and Ray actor
managers, the restart budget, and the events that report deaths and restarts."""

from __future__ import annotations

import enum
import logging
import os
import threading
import time
from collections import deque

import zmq

import fleetllm.config
from fleetllm.config import EngineConfig
from fleetllm.engine.coordinator import CoordinatorManager
from fleetllm.engine.handshake import (
    CoreEngine,
    get_engine_client_zmq_addr,
    unlink_ipc,
    wait_for_engine_startup,
)
from fleetllm.engine.messages import EngineEvent, EngineZmqAddresses
from fleetllm.errors import ScaleError

logger = logging.getLogger(__name__)

RESTART_POLL_PERIOD_MS = 200  # how often a restart's handshake checks for a death or close
EXIT_CODE_WAIT_S = 1.0  # a sentinel turns readable a moment before the exit code is known


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
    RETIRING = enum.auto()  # scaled away: its end is expected, not a death


class RestartingManager:
    """Recovery shared by the process and actor managers. Subclasses start engines
    (`_spawn`) and report each end of a watched one (`_engine_ended`); engines in state
    DEAD are not watched. Indexes are data-parallel ranks."""

    engine_name_format = "EngineCore_{}"

    def _init_recovery(self, config: EngineConfig, indexes: range,
                       data_parallel_size: int) -> None:
        self._config = config
        self._indexes = list(indexes)  # grows and shrinks with elastic scaling
        self._data_parallel_size = data_parallel_size
        self._lock = threading.Lock()
        self._events = EventQueue()
        self._states = dict.fromkeys(indexes, EngineState.STARTING)
        self._epochs = dict.fromkeys(indexes, 0)
        self._ended: dict[int, tuple[int, str]] = {}  # index -> (exit code, how)
        self._addresses: EngineZmqAddresses | None = None
        self._host = "127.0.0.1"
        self._budget = RestartBudget(config.parallel_config.max_worker_restarts)
        # The data-parallel coordinator, when there is one; closed with the engines.
        self.coordinator: CoordinatorManager | None = None
        self._restart_threads: list[threading.Thread] = []
        self._closing = False

    def _spawn(self, index: int, handshake_address: str) -> None:
        """Starts a new engine for index in place of the dead one."""
        raise NotImplementedError

    def _watch_new_engines(self) -> None:
        """Called once an engine has been spawned (the watcher may need waking)."""

    def _prepare_new(self, indexes: list[int], timeout_s: float) -> None:
        """Before a scale-up spawns engines for indexes (Ray reserves their groups)."""

    def _forget(self, index: int) -> None:
        """After a scale-down: ends what is left of engine index and drops it."""
        raise NotImplementedError

    # ---- elastic data parallel ------------------------------------------------------------
    def add_engines(self, count: int, timeout_s: float) -> tuple[list[int], int]:
        """Scale up: starts `count` engines with the next indexes through the handshake, with
        the clients' addresses; returns their indexes and the epoch their outputs carry.
        On failure (no resources, a failed start, the timeout) none of them is left and
        ScaleError says why."""
        with self._lock:
            if self._addresses is None or self._closing:
                raise ScaleError("the engines are not running (starting or shutting down)")
            first = len(self._indexes)
            new = list(range(first, first + count))
            epoch = max(self._epochs.values(), default=0) + 1  # unlike any earlier engine's
            for index in new:
                self._states[index], self._epochs[index] = EngineState.DEAD, epoch
            self._indexes.extend(new)
            self._data_parallel_size = first + count
        address = get_engine_client_zmq_addr(self._host == "127.0.0.1", self._host)
        ctx = zmq.Context()
        handshake = ctx.socket(zmq.ROUTER)
        handshake.setsockopt(zmq.LINGER, 0)
        deadline = time.monotonic() + timeout_s
        try:
            handshake.bind(address)
            self._prepare_new(new, timeout_s)
            for index in new:
                self._spawn(index, address)
                with self._lock:
                    self._states[index] = EngineState.STARTING
            self._watch_new_engines()
            wait_for_engine_startup(
                handshake, self._addresses, [CoreEngine(i) for i in new], self._config,
                _RestartingEngine(self, new), max(0.1, deadline - time.monotonic()),
                data_parallel_size=first + count, epoch=epoch, poll_ms=RESTART_POLL_PERIOD_MS,
                remote=self.remote_engines())
            with self._lock:
                ended = [i for i in new if self._states[i] is not EngineState.STARTING]
                if ended:
                    raise RuntimeError(f"engine core(s) {ended} ended right after starting")
                for index in new:
                    self._states[index] = EngineState.RUNNING
        except Exception as e:
            self._drop(new, first)
            raise ScaleError(f"could not start engine core(s) {new}: {e}") from e
        finally:
            ctx.destroy(linger=0)
            unlink_ipc(address)
        logger.info("scaled up to %d engine cores (new: %s)", first + count, new)
        return new, epoch

    def retire_engines(self, indexes: list[int], timeout_s: float) -> None:
        """Scale down, after the clients moved the engines' requests and told each
        SHUTDOWN_CURRENT_RANK: waits up to timeout_s for them to exit, ends whatever is
        left, and drops them. Only the highest indexes retire, so the rest keep theirs."""
        with self._lock:
            keep = len(self._indexes) - len(indexes)
            assert sorted(indexes) == self._indexes[keep:], (indexes, self._indexes)
            for index in indexes:
                if self._states[index] is not EngineState.DEAD:
                    self._states[index] = EngineState.RETIRING
        self._wait_retired(indexes, timeout_s)
        self._drop(indexes, keep)
        logger.info("scaled down to %d engine cores (removed: %s)", keep, indexes)

    def _wait_retired(self, indexes: list[int], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if all(self._states[i] is EngineState.DEAD for i in indexes):
                    return
            time.sleep(0.02)
        logger.warning("engine core(s) %s did not exit within %.0f s of their shutdown; "
                       "ending them", indexes, timeout_s)

    def _drop(self, indexes: list[int], keep: int) -> None:
        with self._lock:  # unwatched from now on: their end is no death
            del self._indexes[keep:]
            for index in indexes:
                self._states.pop(index, None)
                self._ended.pop(index, None)
            self._data_parallel_size = keep
        self._watch_new_engines()
        for index in sorted(indexes, reverse=True):
            try:
                self._forget(index)
            except Exception:
                logger.warning("could not end engine core %d", index, exc_info=True)

    def start_recovery(self, addresses: EngineZmqAddresses, host: str = "127.0.0.1") -> None:
        """After a successful start-up: engines that end from now on are reported, and
        restarted with these client addresses within the budget."""
        with self._lock:
            self._addresses, self._host = addresses, host
            for index in self._indexes:
                if self._states[index] is EngineState.STARTING:
                    self._states[index] = EngineState.RUNNING

    def remote_engines(self) -> set[int]:
        """Indexes of the engines on another node than this process (none for processes)."""
        return set()

    def engine_name(self, index: int) -> str:
        return self.engine_name_format.format(index)

    def events_fd(self) -> int | None:
        return self._events.fileno()

    def take_events(self) -> list[EngineEvent]:
        return self._events.take()

    def _engine_ended(self, index: int, code: int, detail: str) -> None:
        with self._lock:
            if index not in self._states:
                return  # scaled away meanwhile
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
                _RestartingEngine(self, [index]), data_parallel_size=self._data_parallel_size,
                epoch=epoch, poll_ms=RESTART_POLL_PERIOD_MS, remote=self.remote_engines())
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
                self._events.put(EngineEvent("gone", index, f"restart failed: {e}"))
        finally:
            ctx.destroy(linger=0)
            unlink_ipc(address)

    def _close_coordinator(self) -> None:
        if self.coordinator is not None:
            self.coordinator.close()

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

    def __init__(self, manager: RestartingManager, indexes: list[int]) -> None:
        self.manager = manager
        self.indexes = indexes

    def sentinels(self) -> list[int]:
        return []  # the handshake polls finished_procs every RESTART_POLL_PERIOD_MS

    def finished_procs(self) -> dict[str, int]:
        m = self.manager
        with m._lock:
            if m._closing:
                return {"(the engines are shutting down)": 0}
            return {m.engine_name(i): m._ended[i][0] for i in self.indexes if i in m._ended}

    def join_first(self) -> None:
        deadline = time.monotonic() + EXIT_CODE_WAIT_S
        while not self.finished_procs() and time.monotonic() < deadline:
            time.sleep(0.01)


