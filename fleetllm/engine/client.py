"""Front-end clients of engine-core processes.

SyncMPClient starts one engine-core process per data-parallel rank (or attaches to engines a
supervisor started), sends each request to the live engine with the fewest unfinished
requests, and reads their outputs from one socket. It follows the declared engine interface
(engine/protocol.py), as an in-process EngineCore does, so LLM works with either.

Recovery: the client keeps each unfinished request as first sent, plus the output tokens it
has delivered. When its manager reports an engine dead (an EngineEvent), that engine's
requests are re-sent with those tokens (EngineCoreRequest.output_token_ids) to the live
engines, or, when none is live, kept until the restarted engine is ready. What a dead engine
sent that arrives later (its epoch is old) is dropped, so no token is delivered twice.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import zmq

from fleetllm import errors as fleet_errors
from fleetllm.config import EngineConfig
from fleetllm.distributed.reconfigure import ReconfigureRankType
from fleetllm.engine.coordinator import LoadView
from fleetllm.engine.handshake import unlink_ipc
from fleetllm.engine.launch import (
    EngineConnection,
    EngineManager,
    SupervisorLink,
    launch_core_engines,
)
from fleetllm.engine.messages import (
    EngineCoreOutputs,
    EngineCoreRequest,
    EngineCoreRequestType,
    EngineEvent,
    UtilityCall,
    UtilityResult,
)
from fleetllm.engine.protocol import EngineClientInterface, forward_engine_methods
from fleetllm.errors import EngineDeadError, EngineRestartingError, ScaleInProgressError
from fleetllm.sched.output import EngineCoreOutput

logger = logging.getLogger(__name__)

SHUTDOWN_WAIT_S = 5.0
DRAIN_TIMEOUT_S = 120.0  # vLLM's default drain_timeout for a scale-down
SCALE_TIMEOUT_S = 120.0  # for a scale-up's engines to start
RETIRE_WAIT_S = 10.0  # for a scaled-away engine to exit after its shutdown
MAX_DATA_PARALLEL_SIZE = 1024


@dataclass
class _Unfinished:
    request: EngineCoreRequest  # as first sent
    output_token_ids: list[int] = field(default_factory=list)  # delivered so far
    engine: int | None = None  # None: waiting for a live engine
    recovering: bool = False  # its engine died; counted once it is re-sent


@dataclass
class _EngineLink:
    """The client's view of one engine index."""

    index: int
    epoch: int = 0  # the start of this engine whose outputs count
    ready: bool = True  # that start finished its handshake and has not died
    registered_epoch: int = -1  # the last start that registered on our input socket
    live: bool = False  # ready and registered: requests may be sent to it
    draining: bool = False  # being scaled away: no new requests
    gone: bool = False  # died and could not be restarted; the others serve without it
    error: str | None = None  # what it reported before it died

    @property
    def identity(self) -> bytes:
        return self.index.to_bytes(2, "little")


@forward_engine_methods
class SyncMPClient(EngineClientInterface):
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
        self.engines: list[_EngineLink] = []
        self.load: list[int] = []  # requests sent to each engine and not finished
        self.loads: LoadView | None = None
        self.requests: dict[str, _Unfinished] = {}
        self.dead_reason: str | None = None  # set once the engine is dead for good
        self.num_engine_restarts = 0
        self.num_requests_recovered = 0
        # called with n each time n requests were re-sent after their engine died
        self.on_requests_recovered: Callable[[int], None] | None = None
        self._buffered: list[EngineCoreOutput] = []
        self._results: dict[int, UtilityResult] = {}
        self._pending_calls: dict[int, int] = {}  # utility call id -> engine index
        self._call_errors: dict[int, Exception] = {}
        self._call_ids = itertools.count()
        self.scaling = False  # a scale of the fleet is under way
        self.num_requests_migrated = 0  # moved off engines being scaled away
        self._early_registrations: dict[int, int] = {}  # a scale-up's engines, by index
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
            addrs = connection.addresses
            in_addr, out_addr = addrs.inputs[i], addrs.outputs[i]
            self._ipc_paths = [in_addr, out_addr]
            # Engines on other nodes reach the same sockets over TCP.
            remote_in = addrs.remote_inputs[i] if addrs.remote_inputs else None
            remote_out = addrs.remote_outputs[i] if addrs.remote_outputs else None
            self.input = self._bind(zmq.ROUTER, in_addr, remote_in)
            self.input.setsockopt(zmq.ROUTER_MANDATORY, 1)  # an unknown engine is an error
            # A restarted engine reuses its index's identity, maybe before we saw it go.
            self.input.setsockopt(zmq.ROUTER_HANDOVER, 1)
            self.output = self._bind(zmq.PULL, out_addr, remote_out)
            self.engines = [_EngineLink(e) for e in range(connection.num_engines)]
            self.load = [0] * connection.num_engines
            # Every engine's load as the coordinator publishes it (dp > 1), so that with
            # several API servers each sees the others' requests too.
            self.loads = LoadView(self.ctx, addrs.coordinator_output)
            self._await_registrations()
        except BaseException:
            self.shutdown()
            raise
        logger.info("%d engine core(s) ready, %d KV blocks in all", len(self.engines),
                    self.num_gpu_blocks)

    def _bind(self, kind: int, addr: str, also: str | None = None) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(addr)
        if also is not None:
            sock.bind(also)
        return sock

    def _await_registrations(self) -> None:
        """Each engine says hello on the input socket, so sends to it cannot be dropped."""
        while not all(e.live for e in self.engines):
            self._wait(self.input)

    @property
    def engine_of(self) -> dict[str, int]:
        """Request id -> engine index of each unfinished request (-1: waiting for one)."""
        return {rid: -1 if u.engine is None else u.engine for rid, u in self.requests.items()}

    # ---- requests ---------------------------------------------------------------------
    def add_request(self, req: EngineCoreRequest) -> None:
        self._poll_events()
        self._check_alive()
        self.requests[req.request_id] = _Unfinished(req, list(req.output_token_ids))
        self._dispatch([req.request_id])

    def _dispatch(self, request_ids: list[str]) -> None:
        """The one path that sends requests, first or again: each goes, with the tokens it
        already delivered, to the least loaded live engine; with none live, it waits."""
        live = [e.index for e in self.engines if e.live and not e.draining]
        resent = 0
        for rid in request_ids:
            u = self.requests[rid]
            if not live:
                u.engine = None
                continue
            index = self.loads.choose(live, self.load)
            u.engine = index
            self.load[index] += 1
            self.loads.sent(index)
            payload = msgspec.structs.replace(u.request, output_token_ids=u.output_token_ids)
            self._send(index, EngineCoreRequestType.ADD, self.encoder.encode(payload))
            if u.recovering:
                u.recovering = False
                resent += 1
        if resent:
            self.num_requests_recovered += resent
            logger.info("re-sent %d unfinished request(s) of a dead engine", resent)
            if self.on_requests_recovered is not None:
                self.on_requests_recovered(resent)

    def abort_requests(self, request_ids: list[str]) -> None:
        by_engine: dict[int, list[str]] = {}
        for rid in request_ids:
            u = self.requests.pop(rid, None)
            if u is not None and u.engine is not None:
                self.load[u.engine] -= 1
                by_engine.setdefault(u.engine, []).append(rid)
        if self.dead_reason is not None:
            return  # nobody left to tell
        for index, ids in by_engine.items():
            self._send(index, EngineCoreRequestType.ABORT, self.encoder.encode(ids))

    def has_unfinished_requests(self) -> bool:
        """Also while outputs that a utility call read on the way are not taken yet (their
        requests may have finished meanwhile)."""
        return bool(self.requests) or bool(self._buffered)

    def step(self) -> list[EngineCoreOutput]:
        """The next batch of outputs from any engine (waits for one)."""
        if self._buffered:
            out, self._buffered = self._buffered, []
            return out
        return self._recv()

    def _receive(self, msg: EngineCoreOutputs) -> list[EngineCoreOutput]:
        """Takes one message from an engine: what a dead predecessor or a dying engine sent
        is dropped (its requests are re-sent); the rest is tracked and returned."""
        if msg.engine_index >= len(self.engines):
            return []  # a late message of an engine scaled away
        engine = self.engines[msg.engine_index]
        if msg.epoch != engine.epoch:
            return []
        if msg.engine_dead:  # the process exits next; its death event decides what follows
            engine.error = msg.engine_dead
            return []
        if not engine.live:
            return []
        for result in msg.utility_results:
            if self._pending_calls.pop(result.call_id, None) is not None:
                self._utility_done(result)
        kept = []
        for eo in msg.outputs:
            u = self.requests.get(eo.request_id)
            if u is None or u.engine != msg.engine_index:
                continue  # aborted meanwhile
            u.output_token_ids.extend(eo.new_token_ids)
            if eo.finished:
                del self.requests[eo.request_id]
                self.load[msg.engine_index] -= 1
            kept.append(eo)
        return kept

    # ---- engine deaths and restarts ---------------------------------------------------
    def _poll_events(self) -> bool:
        """Applies what the manager reported and the engines that registered (no wait);
        True if there was any."""
        changed = False
        if self.proc_manager is not None and self.dead_reason is None:
            for event in self.proc_manager.take_events():
                self._apply(event)
                changed = True
        while self.dead_reason is None and hasattr(self, "input") and self.input.poll(0):
            identity, payload = self.input.recv_multipart()
            index, epoch = int.from_bytes(identity, "little"), msgspec.msgpack.decode(
                payload, type=int)
            if index >= len(self.engines):  # a scale-up's engine, before its link exists
                self._early_registrations[index] = epoch
                continue
            engine = self.engines[index]
            engine.registered_epoch = epoch
            self._maybe_live(engine)
            changed = True
        return changed

    def _apply(self, event: EngineEvent) -> None:
        if self.dead_reason is not None:
            return
        if event.kind == "gone" and 0 <= event.index < len(self.engines) and any(
                not e.gone for e in self.engines if e.index != event.index):
            # Its restart failed (say its node was lost, with no room elsewhere): the fleet
            # runs smaller. Its requests moved when it died.
            engine = self.engines[event.index]
            self._engine_died(engine, event.detail)
            engine.gone = True
            logger.warning("engine core %d is gone (%s); serving with the other %d",
                           engine.index, event.detail, sum(not e.gone for e in self.engines))
            return
        if event.final or event.kind == "gone":
            engine = self.engines[event.index] if 0 <= event.index < len(self.engines) else None
            said = f"{engine.error}; " if engine is not None and engine.error else ""
            who = f"engine core {event.index}" if engine is not None else "the engine cores"
            self._fail(f"{who} died: {said}{event.detail}")
        elif event.kind == "dead":
            self._engine_died(self.engines[event.index], event.detail)
        elif event.kind == "ready":
            engine = self.engines[event.index]
            engine.epoch, engine.ready, engine.error = event.epoch, True, None
            self.num_engine_restarts += 1
            self._maybe_live(engine)

    def _engine_died(self, engine: _EngineLink, detail: str) -> None:
        """Moves the engine's requests to the live engines (or holds them) at once."""
        engine.ready = engine.live = False
        error = EngineRestartingError(
            f"engine core {engine.index} died ({detail}) during this call; it is being "
            "restarted, and utility calls are not retried: call again once it is back")
        for call_id, index in list(self._pending_calls.items()):
            if index == engine.index:
                del self._pending_calls[call_id]
                self._fail_calls(call_id, error)
        moved = [rid for rid, u in self.requests.items() if u.engine == engine.index]
        for rid in moved:
            self.requests[rid].recovering = True
        self.load[engine.index] = 0
        logger.warning("engine core %d died (%s); resuming its %d request(s) %s", engine.index,
                       detail, len(moved),
                       "elsewhere" if any(e.live for e in self.engines) else "once it is back")
        self._dispatch(moved)

    def _maybe_live(self, engine: _EngineLink) -> None:
        """A (re)started engine takes requests once it is ready and has registered; the
        requests that were waiting for an engine go out then."""
        if engine.live or not engine.ready or engine.registered_epoch != engine.epoch:
            return
        engine.live = True
        waiting = [rid for rid, u in self.requests.items() if u.engine is None]
        if waiting:
            self._dispatch(waiting)

    def _fail(self, reason: str) -> None:
        if self.dead_reason is None:
            logger.error("engine is dead: %s", reason)
            self.dead_reason = reason

    def _utility_done(self, result: UtilityResult) -> None:
        self._results[result.call_id] = result

    def _fail_calls(self, call_id: int, error: Exception) -> None:
        self._call_errors[call_id] = error

    def _check_alive(self) -> None:
        if self.dead_reason is not None:
            raise EngineDeadError(self.dead_reason)

    def _check_all_live(self, method: str) -> None:
        down = [e.index for e in self.engines if not e.live and not e.gone]
        if down:
            raise EngineRestartingError(
                f"cannot run {method}: engine core(s) {down} died and are being restarted; "
                "call again once they are back")

    # ---- utility calls ----------------------------------------------------------------
    def call_utility(self, method: str, *args: Any, indexes: list[int] | None = None
                     ) -> list[Any]:
        """Calls an EngineCore method on every engine (or those of `indexes`); one result
        per engine."""
        self._poll_events()
        self._check_alive()
        self._check_all_live(method)
        call_ids = self._send_utility(method, args, indexes)
        try:
            while not all(c in self._results for c in call_ids):
                failed = [self._call_errors[c] for c in call_ids if c in self._call_errors]
                if failed:
                    raise failed[0]
                self._buffered.extend(self._recv())
        finally:
            for c in call_ids:
                self._pending_calls.pop(c, None)
                self._call_errors.pop(c, None)
            results = [self._results.pop(c, None) for c in call_ids]
        return check_utility_results(method, results)

    def _send_utility(self, method: str, args: tuple, indexes: list[int] | None = None
                      ) -> list[int]:
        call_ids = []
        for engine in self._targets(indexes):
            call_id = next(self._call_ids)
            call_ids.append(call_id)
            self._pending_calls[call_id] = engine.index
            self._send(engine.index, EngineCoreRequestType.UTILITY,
                       self.encoder.encode(UtilityCall(call_id, method, list(args))))
        return call_ids

    def _targets(self, indexes: list[int] | None) -> list[_EngineLink]:
        """The engines a utility call goes to: all, or those of indexes; never one gone."""
        engines = self.engines if indexes is None else [self.engines[i] for i in indexes]
        return [e for e in engines if not e.gone]

    def collective_rpc(self, method: str, timeout: float | None = None, args: tuple = (),
                       kwargs: dict[str, Any] | None = None) -> list[Any]:
        if not isinstance(method, str):
            raise TypeError("with engine processes, collective_rpc takes a worker method name; "
                            "callables cannot be sent over the engine's typed messages")
        per_engine = self.call_utility("collective_rpc", method, timeout, list(args), kwargs)
        return [r for engine_results in per_engine for r in engine_results]

    # ---- elastic data parallel ---------------------------------------------------------
    def scale_data_parallel(self, new_size: int, drain_timeout: float = DRAIN_TIMEOUT_S,
                            timeout_s: float = SCALE_TIMEOUT_S) -> None:
        """Grows or shrinks the fleet to new_size engines while it serves. Scale-down
        stops routing to the highest engines, lets their requests finish for up to
        drain_timeout seconds, moves the rest (prompt plus delivered tokens) to the others,
        and ends them. A failed scale leaves the fleet as it was (ScaleError)."""
        old = self._begin_scale(new_size)
        try:
            if new_size > old:
                indexes, epoch = self.proc_manager.add_engines(new_size - old, timeout_s)
                self._add_links(indexes, epoch)
                self._await_registrations()
            elif new_size < old:
                retiring = list(range(new_size, old))
                self._begin_drain(retiring)
                deadline = time.monotonic() + drain_timeout
                while self._on_engines(retiring) and time.monotonic() < deadline:
                    self._buffered.extend(self._recv())
                self._migrate(retiring)
                self.call_utility("reinitialize_distributed", new_size,
                                  ReconfigureRankType.SHUTDOWN_CURRENT_RANK, indexes=retiring)
                self.proc_manager.retire_engines(retiring, RETIRE_WAIT_S)
                self._remove_links(new_size)
            kept = list(range(min(old, new_size)))
            self.call_utility("reinitialize_distributed", new_size,
                              ReconfigureRankType.KEEP_CURRENT_RANK, indexes=kept)
        finally:
            self._end_scale()

    def _begin_scale(self, new_size: int) -> int:
        self._poll_events()
        self._check_alive()
        if isinstance(new_size, bool) or not isinstance(new_size, int) or not (
                1 <= new_size <= MAX_DATA_PARALLEL_SIZE):
            raise ValueError(f"new_data_parallel_size={new_size!r} must be an integer from 1 "
                             f"to {MAX_DATA_PARALLEL_SIZE}")
        if not self._owns_engines or not hasattr(self.proc_manager, "add_engines"):
            raise ValueError("this front end does not own its engines (several API servers "
                             "share them); scaling needs --api-server-count 1")
        if self.scaling:
            raise ScaleInProgressError("a scale of the fleet is under way; wait for it "
                                       "(GET /is_scaling_elastic_ep) and try again")
        self._check_all_live("a scale")
        self.scaling = True
        return len(self.engines)

    def _end_scale(self) -> None:
        for engine in self.engines:  # a failed scale-down keeps its engines serving
            engine.draining = False
        self.scaling = False

    def _add_links(self, indexes: list[int], epoch: int) -> None:
        for index in indexes:
            engine = _EngineLink(index, epoch=epoch)
            engine.registered_epoch = self._early_registrations.pop(index, -1)
            self.engines.append(engine)
            self.load.append(0)
            self._maybe_live(engine)

    def _begin_drain(self, indexes: list[int]) -> None:
        for index in indexes:
            self.engines[index].draining = True

    def _on_engines(self, indexes: list[int]) -> int:
        return sum(1 for u in self.requests.values() if u.engine in indexes)

    def _migrate(self, indexes: list[int]) -> None:
        """Moves what the drain left on the engines of indexes to the others, as a dead
        engine's requests are moved: prompt plus the tokens delivered so far."""
        by_engine: dict[int, list[str]] = {}
        for rid, u in self.requests.items():
            if u.engine in indexes:
                by_engine.setdefault(u.engine, []).append(rid)
        for index, ids in by_engine.items():
            self._send(index, EngineCoreRequestType.ABORT, self.encoder.encode(ids))
            self.load[index] -= len(ids)
        moved = [rid for ids in by_engine.values() for rid in ids]
        if moved:
            logger.info("moving %d request(s) off engine core(s) %s", len(moved), indexes)
            self.num_requests_migrated += len(moved)
            self._dispatch(moved)

    def _remove_links(self, new_size: int) -> None:
        del self.engines[new_size:]
        del self.load[new_size:]

    # ---- plumbing ---------------------------------------------------------------------
    def _send(self, index: int, kind: EngineCoreRequestType, payload: bytes) -> None:
        try:
            self.input.send_multipart([self.engines[index].identity, kind.value, payload],
                                      copy=False)
        except zmq.ZMQError as e:
            if e.errno != zmq.EHOSTUNREACH:
                raise
            # The engine is gone and its death not reported yet: its requests are re-sent
            # and its utility calls failed when it is.
            logger.debug("engine core %d is unreachable; waiting for its death event", index)

    def _recv(self) -> list[EngineCoreOutput]:
        """One message's outputs (possibly none); [] too once an engine died or came back,
        so callers look again at what they wait for."""
        if self._wait(self.output):
            return self._receive(self.decoder.decode(self.output.recv()))
        return []

    def _wait(self, sock: zmq.Socket) -> bool:
        """Waits until sock is readable (True) or an engine event or registration was
        applied (False); raises EngineDeadError once the engine is dead for good."""
        poller = zmq.Poller()
        for s in {sock, self.input}:
            poller.register(s, zmq.POLLIN)
        events_fd = self.proc_manager.events_fd() if self.proc_manager else None
        if events_fd is not None:
            poller.register(events_fd, zmq.POLLIN)
        while True:
            ready = dict(poller.poll(1000))
            changed = self._poll_events()
            self._check_alive()
            if sock is not self.input and sock in ready:
                return True
            if changed:
                return False

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._stop_engines()
        finally:  # whatever failed there, the sockets and their files go
            if self.loads is not None:
                self.loads.close()
            self.ctx.destroy(linger=0)
            unlink_ipc(*self._ipc_paths)

    def _stop_engines(self) -> None:
        if self.proc_manager is not None:
            if self._owns_engines and hasattr(self, "input"):
                self.proc_manager.begin_shutdown()
                for engine in self.engines:
                    if not engine.ready:
                        continue  # dead, or restarting: the manager ends it
                    try:
                        self.input.send_multipart([
                            engine.identity, EngineCoreRequestType.UTILITY.value,
                            self.encoder.encode(UtilityCall(-1, "shutdown"))])
                    except zmq.ZMQError:
                        pass  # already gone
                self.proc_manager.wait_for_exit(SHUTDOWN_WAIT_S)
            self.proc_manager.close()


def check_utility_results(method: str, results: list[UtilityResult | None]) -> list[Any]:
    errors = [r.error for r in results if r is not None and r.error]
    if errors:
        raise utility_error(method, errors[0])
    return [r.result for r in results]


def utility_error(method: str, error: str) -> Exception:
    """An engine method's error ("Type: message") as the same type where it is a fleetllm
    error, ValueError or TypeError (a bad adapter stays a LoRAAdapterError, so callers can
    tell a bad argument from a broken engine), else a RuntimeError."""
    name, _, message = error.partition(": ")
    cls = getattr(fleet_errors, name, None) or {"ValueError": ValueError,
                                                "TypeError": TypeError}.get(name)
    if isinstance(cls, type) and issubclass(cls, Exception):
        if issubclass(cls, fleet_errors.FleetLLMError):
            message = message.split("] ", 1)[-1]  # its code is added again
        try:
            return cls(message)
        except TypeError:
            pass
    return RuntimeError(f"{method} failed in the engine: {error}")
