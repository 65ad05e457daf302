"""The engine-core start-up handshake (HELLO, addresses, READY) and the addresses it uses.

A restart runs the same handshake for one engine (restart.py)."""

from __future__ import annotations

import enum
import os
import tempfile
import time
from typing import Protocol

import msgspec
import zmq

from fleetllm.config import EngineConfig
from fleetllm.engine.messages import EngineHandshakeMetadata, EngineZmqAddresses, HandshakeStatus

STARTUP_POLL_PERIOD_MS = 10_000
STARTUP_TIMEOUT_S = 600.0


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


def wait_for_engine_startup(handshake_socket: zmq.Socket, addresses: EngineZmqAddresses,
                            core_engines: list[CoreEngine], config: EngineConfig,
                            proc_manager: StartingEngines | None,
                            timeout_s: float = STARTUP_TIMEOUT_S, *,
                            data_parallel_size: int | None = None, epoch: int = 0,
                            poll_ms: int = STARTUP_POLL_PERIOD_MS,
                            remote: set[int] | frozenset[int] = frozenset()) -> int:
    """Runs the HELLO / metadata / READY handshake with every engine; returns the summed
    number of KV blocks. Fails at once, with exit codes, if an engine process dies.

    A restart runs it for one engine of data_parallel_size, whose outputs carry epoch.
    Engines in `remote` (on other nodes) are given the clients' TCP addresses."""
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
                meta = EngineHandshakeMetadata(addresses.for_engine(engine.index in remote), {
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


def unlink_ipc(*addresses: str) -> None:
    for address in addresses:
        if address.startswith("ipc://"):
            try:
                os.unlink(address[len("ipc://"):])
            except FileNotFoundError:
                pass
