"""Front-end clients of engine-core processes.

SyncMPClient starts one engine-core process per data-parallel rank, sends each request to
the engine with the fewest unfinished requests, and reads their outputs from one socket.
It offers what the offline LLM needs of an in-process EngineCore, so LLM works with either.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

import msgspec
import zmq

from fleetllm.config import EngineConfig
from fleetllm.engine.launch import (
    CoreEngine,
    EngineConnection,
    EngineManager,
    SupervisorLink,
    launch_core_engines,
    unlink_ipc,
)
from fleetllm.engine.messages import (
    EngineCoreOutputs,
    EngineCoreRequest,
    EngineCoreRequestType,
    UtilityCall,
)
from fleetllm.errors import EngineDeadError
from fleetllm.sched.output import EngineCoreOutput
from fleetllm.sched.request import Request

logger = logging.getLogger(__name__)

SHUTDOWN_WAIT_S = 5.0


class SyncMPClient:
    """Starts engine cores (processes, or Ray actors with data_parallel_backend="ray") and
    owns them; or, given `connection`, attaches to engines a supervisor started (each API
    server process does so with its own socket pair)."""

    def __init__(self, config: EngineConfig, data_parallel_size: int = 1,
                 data_parallel_backend: str = "mp", *,
                 connection: EngineConnection | None = None) -> None:
        self.config = config
        self.ctx = zmq.Context()
        self._closed = False
        self._owns_engines = connection is None
        self.proc_manager: EngineManager | None = None
        self._ipc_paths: list[str] = []
        self.engines: list[CoreEngine] = []
        self.load: list[int] = []
        self.engine_of: dict[str, int] = {}
        self._buffered: list[EngineCoreOutput] = []
        self._results: dict[int, Any] = {}
        self._call_ids = itertools.count()
        self.encoder = msgspec.msgpack.Encoder()
        self.decoder = msgspec.msgpack.Decoder(EngineCoreOutputs)
        try:
            if connection is None:
                self.proc_manager, addresses, self.num_gpu_blocks = launch_core_engines(
                    config, data_parallel_size, data_parallel_backend)
                connection = EngineConnection(addresses, 0, data_parallel_size)
            else:
                self.proc_manager = SupervisorLink(connection.supervisor)
                self.num_gpu_blocks = connection.num_gpu_blocks
            i = connection.client_index
            in_addr, out_addr = connection.addresses.inputs[i], connection.addresses.outputs[i]
            self._ipc_paths = [in_addr, out_addr]
            self.input = self._bind(zmq.ROUTER, in_addr)
            self.input.setsockopt(zmq.ROUTER_MANDATORY, 1)  # an unknown engine is an error
            self.output = self._bind(zmq.PULL, out_addr)
            self.engines = [CoreEngine(e) for e in range(connection.num_engines)]
            self.load = [0] * connection.num_engines  # unfinished requests per engine
            self._await_registrations()
        except BaseException:
            self.shutdown()
            raise
        logger.info("%d engine core(s) ready, %d KV blocks in all", len(self.engines),
                    self.num_gpu_blocks)

    def _bind(self, kind: int, addr: str) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(addr)
        return sock

    def _await_registrations(self) -> None:
        """Each engine says hello on the input socket, so sends to it cannot be dropped."""
        pending = {e.identity for e in self.engines}
        while pending:
            self._wait_readable(self.input)
            identity, _ = self.input.recv_multipart()
            pending.discard(identity)

    # ---- requests ---------------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        index = min(range(len(self.engines)), key=self.load.__getitem__)
        self.load[index] += 1
        self.engine_of[req.request_id] = index
        payload = EngineCoreRequest(req.request_id, req.all_token_ids, req.sampling_params,
                                    list(req.eos_token_ids), req.cache_salt)
        self._send(index, EngineCoreRequestType.ADD, self.encoder.encode(payload))

    def abort_requests(self, request_ids: list[str]) -> None:
        by_engine: dict[int, list[str]] = {}
        for rid in request_ids:
            index = self.engine_of.pop(rid, None)
            if index is not None:
                self.load[index] -= 1
                by_engine.setdefault(index, []).append(rid)
        for index, ids in by_engine.items():
            self._send(index, EngineCoreRequestType.ABORT, self.encoder.encode(ids))

    def has_unfinished_requests(self) -> bool:
        return bool(self.engine_of)

    def step(self) -> list[EngineCoreOutput]:
        """The next batch of outputs from any engine (waits for one)."""
        if self._buffered:
            out, self._buffered = self._buffered, []
            return out
        return self._track(self._recv())

    def _track(self, outputs: list[EngineCoreOutput]) -> list[EngineCoreOutput]:
        for eo in outputs:
            if eo.finished:
                index = self.engine_of.pop(eo.request_id, None)
                if index is not None:
                    self.load[index] -= 1
        return outputs

    # ---- utility calls ----------------------------------------------------------------
    def call_utility(self, method: str, *args: Any) -> list[Any]:
        """Calls an EngineCore method on every engine; one result per engine."""
        call_ids = []
        for index in range(len(self.engines)):
            call_id = next(self._call_ids)
            call_ids.append(call_id)
            self._send(index, EngineCoreRequestType.UTILITY,
                       self.encoder.encode(UtilityCall(call_id, method, list(args))))
        while any(c not in self._results for c in call_ids):
            self._buffered.extend(self._track(self._recv()))
        results = [self._results.pop(c) for c in call_ids]
        errors = [r.error for r in results if r.error]
        if errors:
            raise RuntimeError(f"{method} failed in the engine: {errors[0]}")
        return [r.result for r in results]

    def collective_rpc(self, method: str, timeout: float | None = None, args: tuple = (),
                       kwargs: dict[str, Any] | None = None) -> list[Any]:
        if not isinstance(method, str):
            raise TypeError("with engine processes, collective_rpc takes a worker method name; "
                            "callables cannot be sent over the engine's typed messages")
        per_engine = self.call_utility("collective_rpc", method, timeout, list(args), kwargs)
        return [r for engine_results in per_engine for r in engine_results]

    def reset_prefix_cache(self) -> bool:
        return all(self.call_utility("reset_prefix_cache"))

    def sleep(self, level: int = 1) -> None:
        self.call_utility("sleep", level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        self.call_utility("wake_up", tags)

    def stats(self) -> dict[str, float]:
        merged: dict[str, float] = {}
        for s in self.call_utility("stats"):
            for k, v in s.items():
                merged[k] = merged.get(k, 0) + v
        return merged

    def get_performance_metrics(self) -> list[dict[str, Any]]:
        return self.call_utility("get_performance_metrics")

    def save_sharded_state(self, path: str, pattern: str | None = None,
                           max_size: int | None = None) -> None:
        self.call_utility("save_sharded_state", path, pattern, max_size)

    # ---- plumbing ---------------------------------------------------------------------
    def _send(self, index: int, kind: EngineCoreRequestType, payload: bytes) -> None:
        self._check_alive()
        self.input.send_multipart([self.engines[index].identity, kind.value, payload],
                                  copy=False)

    def _recv(self) -> list[EngineCoreOutput]:
        while True:
            self._wait_readable(self.output)
            msg = self.decoder.decode(self.output.recv())
            if msg.engine_dead:
                raise EngineDeadError(f"engine core {msg.engine_index} failed: "
                                      f"{msg.engine_dead}")
            for result in msg.utility_results:
                self._results[result.call_id] = result
            if msg.outputs or not msg.utility_results:
                return msg.outputs
            if self._results:
                return []

    def _wait_readable(self, sock: zmq.Socket) -> None:
        """Waits for sock, failing at once if an engine process dies meanwhile."""
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        for sentinel in self.proc_manager.sentinels():
            poller.register(sentinel, zmq.POLLIN)
        while True:
            events = dict(poller.poll(1000))
            if sock in events:
                return
            self._check_alive()

    def _check_alive(self) -> None:
        dead = self.proc_manager.finished_procs() if self.proc_manager else {}
        if dead:
            raise EngineDeadError(f"engine core process(es) exited: {dead}")

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.proc_manager is not None:
            if self._owns_engines and hasattr(self, "input"):
                for engine in self.engines:
                    try:
                        self.input.send_multipart([
                            engine.identity, EngineCoreRequestType.UTILITY.value,
                            self.encoder.encode(UtilityCall(-1, "shutdown"))])
                    except zmq.ZMQError:
                        pass  # not connected (start-up failed) or already gone
                self.proc_manager.wait_for_exit(SHUTDOWN_WAIT_S)
            self.proc_manager.close()
        self.ctx.destroy(linger=0)
        unlink_ipc(*self._ipc_paths)
