"""DPCoordinator: every API server sees every data-parallel engine's load.

Each API server only knows the requests it sent itself, so with several servers the
engines' real load is invisible to each. Engines report their waiting and running counts
(EngineLoad, at most every LOAD_REPORT_S and whenever they change while idle) to the
coordinator process, which publishes the table (LoadSnapshot, ZMQ PUB) to every API
server's SUB socket. A server sends a new request to the engine with the lowest
`4 * waiting + running`, from the last snapshot plus its own sends since then.

The coordinator is a process of its own, supervised: CoordinatorManager restarts it when
it dies (engines and servers reconnect to the same addresses on their own; meanwhile
servers balance by their own counts, so nothing fails), and ends it on close.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
from multiprocessing.process import BaseProcess

import msgspec
import zmq

from fleetllm.engine.handshake import unlink_ipc

logger = logging.getLogger(__name__)

LOAD_REPORT_S = 0.1  # engines report at most this often while they run steps
HEARTBEAT_S = 1.0  # and at least this often, so a restarted coordinator learns the table
WAITING_WEIGHT = 4  # a waiting request costs more than a running one: it needs a prefill
MAX_ENGINES = 4096  # a report from a higher index is not an engine of ours


class EngineLoad(msgspec.Struct, array_like=True):
    engine_index: int
    waiting: int
    running: int


class LoadSnapshot(msgspec.Struct, array_like=True):
    seq: int
    waiting: list[int]
    running: list[int]


def load_score(waiting: int, running: int) -> int:
    return WAITING_WEIGHT * waiting + running


def run_coordinator(input_address: str, output_address: str, num_engines: int) -> None:
    """The coordinator process: collect EngineLoads, publish LoadSnapshots."""
    from fleetllm.engine.core_proc import set_process_name

    set_process_name("fleetllm-coord")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the owner decides
    parent = os.getppid()
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pub = ctx.socket(zmq.PUB)
    try:
        for sock, address in ((pull, input_address), (pub, output_address)):
            sock.setsockopt(zmq.LINGER, 0)
            sock.bind(address)
        decoder = msgspec.msgpack.Decoder(EngineLoad)
        encoder = msgspec.msgpack.Encoder()
        snapshot = LoadSnapshot(0, [0] * num_engines, [0] * num_engines)
        while os.getppid() == parent:
            if not pull.poll(500):
                continue
            while pull.poll(0):
                load = decoder.decode(pull.recv())
                if 0 <= load.engine_index < MAX_ENGINES:
                    grow = load.engine_index + 1 - len(snapshot.waiting)  # a scale-up's
                    snapshot.waiting.extend([0] * grow)
                    snapshot.running.extend([0] * grow)
                    snapshot.waiting[load.engine_index] = load.waiting
                    snapshot.running[load.engine_index] = load.running
            snapshot.seq += 1
            pub.send(encoder.encode(snapshot))
    finally:
        ctx.destroy(linger=0)


class LoadReporter:
    """An engine core's side: reports its counts to the coordinator, rate-limited."""

    def __init__(self, ctx: zmq.Context, address: str | None, engine_index: int) -> None:
        self.engine_index = engine_index
        self.sock: zmq.Socket | None = None
        if address is not None:
            self.sock = ctx.socket(zmq.PUSH)
            self.sock.setsockopt(zmq.LINGER, 0)
            self.sock.setsockopt(zmq.SNDHWM, 16)  # a dead coordinator must not block us
            self.sock.connect(address)
        self._last: tuple[int, int] | None = None
        self._sent_at = 0.0
        self._encoder = msgspec.msgpack.Encoder()

    def report(self, waiting: int, running: int) -> None:
        if self.sock is None:
            return
        now = time.monotonic()
        counts = (waiting, running)
        since = now - self._sent_at
        if since < HEARTBEAT_S and (counts == self._last or
                                    since < LOAD_REPORT_S and counts != (0, 0)):
            return
        try:
            self.sock.send(self._encoder.encode(EngineLoad(self.engine_index, *counts)),
                           zmq.NOBLOCK)
        except zmq.Again:
            return  # the coordinator is gone or slow: the next report goes instead
        self._last, self._sent_at = counts, now

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=0)


class LoadView:
    """An API server's side: the last snapshot plus its own sends since it arrived."""

    def __init__(self, ctx: zmq.Context, address: str | None) -> None:
        self.sock: zmq.Socket | None = None
        if address is not None:
            self.sock = ctx.socket(zmq.SUB)
            self.sock.setsockopt(zmq.LINGER, 0)
            self.sock.setsockopt(zmq.SUBSCRIBE, b"")
            self.sock.connect(address)
        self.snapshot: LoadSnapshot | None = None
        self.sent_since: dict[int, int] = {}
        self._decoder = msgspec.msgpack.Decoder(LoadSnapshot)

    def _refresh(self) -> None:
        while self.sock is not None and self.sock.poll(0):
            self.snapshot = self._decoder.decode(self.sock.recv())
            self.sent_since = {}

    def score(self, index: int) -> int | None:
        """Engine index's load by the last snapshot plus this server's sends since; None
        without a snapshot that covers it (no coordinator, or an engine just added)."""
        snap = self.snapshot
        if snap is None or index >= len(snap.waiting):
            return None
        return load_score(snap.waiting[index], snap.running[index]) + self.sent_since.get(
            index, 0)

    def choose(self, live: list[int], own_load: list[int]) -> int:
        """The live engine to send the next request to: by the published loads where the
        snapshot covers every live engine, else by what this server itself sent."""
        self._refresh()
        scores = [self.score(i) for i in live]
        if None in scores:
            return min(live, key=own_load.__getitem__)
        return min(zip(scores, live), key=lambda s: (s[0], own_load[s[1]]))[1]

    def sent(self, index: int) -> None:
        self.sent_since[index] = self.sent_since.get(index, 0) + 1

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=0)


class CoordinatorManager:
    """Starts the coordinator process, restarts it when it dies, and ends it."""

    def __init__(self, input_address: str, output_address: str, num_engines: int) -> None:
        self.addresses = (input_address, output_address)
        self.num_engines = num_engines
        self.num_restarts = 0
        self._ctx = multiprocessing.get_context("spawn")
        self._lock = threading.Lock()
        self._closed = False
        self.proc: BaseProcess = self._start()
        self._stop_r, self._stop_w = multiprocessing.connection.Pipe(duplex=False)
        self._watcher = threading.Thread(target=self._watch, daemon=True,
                                         name="fleetllm-coord-watch")
        self._watcher.start()

    def _start(self) -> BaseProcess:
        proc = self._ctx.Process(target=run_coordinator, name="DPCoordinator", daemon=True,
                                 args=(*self.addresses, self.num_engines))
        proc.start()
        return proc

    def _watch(self) -> None:
        while True:
            ready = multiprocessing.connection.wait([self.proc.sentinel, self._stop_r])
            with self._lock:
                if self._closed or self._stop_r in ready:
                    return
                logger.warning("the data-parallel coordinator died (exit code %s); restarting "
                               "it (API servers balance by their own counts meanwhile)",
                               self.proc.exitcode)
                self.proc.join(1)
                self.proc.close()
                self.proc = self._start()
                self.num_restarts += 1

    def pid(self) -> int | None:
        return self.proc.pid

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._stop_w.send(b"")
        self._watcher.join(5)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(2)
        for conn in (self._stop_r, self._stop_w):
            conn.close()
        unlink_ipc(*self.addresses)


def coordinator_addresses(local_only: bool, host: str) -> tuple[str, str]:
    from fleetllm.engine.handshake import get_engine_client_zmq_addr

    return (get_engine_client_zmq_addr(local_only, host),
            get_engine_client_zmq_addr(local_only, host))
