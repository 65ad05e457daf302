"""EngineCoreProc: the engine core's busy loop in its own process, talking ZMQ.

Start-up: connect to the front end's handshake socket, send HELLO, receive the addresses of
the input and output sockets, build the engine (executor and workers), send READY with the
number of KV blocks. Then: read requests while there is no work, step while there is, and
push each step's outputs. Every message is a typed msgspec struct.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

import msgspec
import torch
import zmq

from fleetllm.config import EngineConfig
from fleetllm.distributed.reconfigure import SHARED_CORES_ENV, threads_per_rank
from fleetllm.engine.coordinator import LoadReporter
from fleetllm.engine.core import EngineCore
from fleetllm.engine.messages import (
    EngineCoreOutputs,
    EngineCoreRequest,
    EngineCoreRequestType,
    EngineHandshakeMetadata,
    HandshakeStatus,
    UtilityCall,
    UtilityResult,
)
from fleetllm.engine.protocol import ENGINE_METHODS
from fleetllm.sched.output import EngineCoreOutput

logger = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_MS = 60_000
IDLE_POLL_MS = 500  # how often an idle engine checks that its parent is alive
UTILITY_METHODS = frozenset(ENGINE_METHODS)  # the declared interface, nothing else


class EngineCoreProc:
    def __init__(self, config: EngineConfig, handshake_address: str, engine_index: int,
                 ctx: zmq.Context) -> None:
        self.engine_index = engine_index
        self.identity = engine_index.to_bytes(2, "little")
        self.ctx = ctx
        handshake = ctx.socket(zmq.DEALER)
        handshake.setsockopt(zmq.IDENTITY, self.identity)
        handshake.setsockopt(zmq.LINGER, 1000)
        handshake.connect(handshake_address)
        try:
            handshake.send(msgspec.msgpack.encode(HandshakeStatus("HELLO")))
            if not handshake.poll(HANDSHAKE_TIMEOUT_MS):
                raise TimeoutError("the front end did not answer HELLO")
            meta = msgspec.msgpack.decode(handshake.recv(), type=EngineHandshakeMetadata)
            self.epoch = meta.epoch  # so a restarted engine's outputs are told from its
            # predecessor's
            try:
                self.core = EngineCore(config)
            except Exception as e:  # tell the front end why, then exit non-zero
                handshake.send(msgspec.msgpack.encode(
                    HandshakeStatus("FAILED", error=f"{type(e).__name__}: {e}")))
                raise
            # One socket pair per front-end client (API server): requests come in on the
            # client's input socket, and their outputs go back on its output socket.
            self.inputs: list[zmq.Socket] = []
            for address in meta.addresses.inputs:
                sock = ctx.socket(zmq.DEALER)
                sock.setsockopt(zmq.IDENTITY, self.identity)
                sock.setsockopt(zmq.LINGER, 0)
                sock.connect(address)
                # Registers our identity with the client's router; the epoch tells the
                # client which start of this engine may now be sent requests.
                sock.send(msgspec.msgpack.encode(self.epoch))
                self.inputs.append(sock)
            self.outputs: list[zmq.Socket] = []
            for address in meta.addresses.outputs:
                sock = ctx.socket(zmq.PUSH)
                sock.setsockopt(zmq.LINGER, 1000)
                sock.connect(address)
                self.outputs.append(sock)
            self.load_reporter = LoadReporter(ctx, meta.addresses.coordinator_input,
                                              engine_index)
            blocks = self.core.config.cache_config.num_gpu_blocks or 0
            handshake.send(msgspec.msgpack.encode(HandshakeStatus("READY", True, blocks)))
        finally:
            handshake.close()
        self.encoder = msgspec.msgpack.Encoder()
        self.request_decoder = msgspec.msgpack.Decoder(EngineCoreRequest)
        self.utility_decoder = msgspec.msgpack.Decoder(UtilityCall)
        self.parent = os.getppid()
        self.client_of: dict[str, int] = {}  # request id -> index of the client that sent it

    @staticmethod
    def run_engine_core(config: EngineConfig, handshake_address: str, dp_rank: int = 0,
                        local_dp_rank: int = 0, data_parallel_size: int = 1,
                        in_actor: bool = False) -> None:
        """Process (or Ray actor) entry point."""
        if not in_actor:  # Ray owns an actor's signals and name
            set_process_name(f"fleetllm-core{dp_rank}")
            signal.signal(signal.SIGTERM, _raise_exit)
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # the front end decides
        logging.basicConfig(level=logging.INFO,
                            format=f"%(levelname)s engine{dp_rank} %(name)s: %(message)s")
        _share_cores(config, data_parallel_size)
        ctx = zmq.Context()
        proc = None
        try:
            proc = EngineCoreProc(config, handshake_address, dp_rank, ctx)
            proc.run_busy_loop(check_parent=not in_actor)
        finally:
            if proc is not None:
                proc.close()
            ctx.destroy(linger=0)

    def run_busy_loop(self, check_parent: bool = True) -> None:
        poller = zmq.Poller()
        for sock in self.inputs:
            poller.register(sock, zmq.POLLIN)
        while True:
            busy = self.core.has_unfinished_requests()
            ready = dict(poller.poll(0 if busy else IDLE_POLL_MS))
            if not ready and not busy:
                if check_parent and os.getppid() != self.parent:
                    logger.info("front end is gone; exiting")
                    return
                continue
            for client, sock in enumerate(self.inputs):
                while sock in ready and sock.poll(0):
                    if not self._handle(client, sock.recv_multipart()):
                        return
            if self.core.has_unfinished_requests():
                try:
                    outputs = self.core.step()
                except Exception as e:  # the engine cannot go on; say so, then exit
                    logger.exception("engine step failed")
                    dead = EngineCoreOutputs(self.engine_index,
                                             engine_dead=f"{type(e).__name__}: {e}")
                    for client in range(len(self.outputs)):
                        self._send(client, dead)
                    raise
                self._send_outputs(outputs)
            self._report_load()  # after the step: one that finished everything reports 0

    def _report_load(self) -> None:
        sched = self.core.scheduler
        self.load_reporter.report(len(sched.waiting), len(sched.running))

    def _send_outputs(self, outputs: list[EngineCoreOutput]) -> None:
        if len(self.outputs) == 1:  # one client: no routing
            for eo in outputs:
                if eo.finished:
                    self.client_of.pop(eo.request_id, None)
            self._send(0, EngineCoreOutputs(self.engine_index, outputs, stats=self.core.stats()))
            return
        by_client: dict[int, list[EngineCoreOutput]] = {}
        for eo in outputs:
            client = (self.client_of.pop if eo.finished else self.client_of.get)(eo.request_id, 0)
            by_client.setdefault(client, []).append(eo)
        stats = self.core.stats()
        for client, outs in by_client.items():
            self._send(client, EngineCoreOutputs(self.engine_index, outs, stats=stats))

    def _handle(self, client: int, frames: list[bytes]) -> bool:
        kind, payload = EngineCoreRequestType(frames[0]), frames[1]
        if kind == EngineCoreRequestType.ADD:
            r = self.request_decoder.decode(payload)
            self.client_of[r.request_id] = client
            try:
                self.core.add_request(r)
            except (RuntimeError, ValueError) as e:  # this request fails, not the engine
                self._send_outputs([EngineCoreOutput(r.request_id, [], finish_reason="error",
                                                     error=str(e))])
        elif kind == EngineCoreRequestType.ABORT:
            ids = msgspec.msgpack.decode(payload, type=list[str])
            for rid in ids:
                self.client_of.pop(rid, None)
            self.core.abort_requests(ids)
        else:
            call = self.utility_decoder.decode(payload)
            if call.method == "shutdown":
                return False
            self._send(client, EngineCoreOutputs(self.engine_index, utility_results=[
                self._utility(call)], stats=self.core.stats()))
            if call.method == "reinitialize_distributed" and self.core.dead_reason:
                logger.info("this engine was scaled away; exiting")
                return False  # told SHUTDOWN_CURRENT_RANK: its executor has ended
        return True

    def _utility(self, call: UtilityCall) -> UtilityResult:
        if call.method not in UTILITY_METHODS:
            return UtilityResult(call.call_id, error=f"unknown utility method {call.method!r}")
        try:
            args = ENGINE_METHODS[call.method].convert(call.args)
            return UtilityResult(call.call_id, getattr(self.core, call.method)(*args))
        except Exception as e:
            return UtilityResult(call.call_id, error=f"{type(e).__name__}: {e}")

    def _send(self, client: int, outputs: EngineCoreOutputs) -> None:
        outputs.epoch = self.epoch
        self.outputs[client].send(self.encoder.encode(outputs), copy=False)

    def close(self) -> None:
        try:
            self.core.shutdown()
        finally:
            for sock in self.inputs:
                sock.close(linger=0)
            for sock in self.outputs:
                sock.close(linger=1000)
            self.load_reporter.close()


def set_process_name(name: str) -> None:
    """Names this process for ps, top and psutil (Linux: /proc/self/comm, 15 characters)."""
    try:
        with open("/proc/self/comm", "w") as f:
            f.write(name[:15])
    except OSError:
        pass  # not Linux; only cosmetic


def _share_cores(config: EngineConfig, data_parallel_size: int) -> None:
    """Data-parallel engines on one CPU machine split its cores, unless the user chose."""
    if "OMP_NUM_THREADS" in os.environ or config.device_config.device != "cpu":
        return
    # Marked even with one engine, so that a later scale-up re-splits the cores.
    os.environ[SHARED_CORES_ENV] = "1"
    if data_parallel_size == 1:
        return
    threads = threads_per_rank(data_parallel_size, config.parallel_config.world_size)
    # Each rank's share; worker processes read the variable when they import torch.
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


def _raise_exit(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # let the cleanup finish
    raise SystemExit(128 + signum)
