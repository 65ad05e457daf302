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
import zmq

from fleetllm.config import EngineConfig
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
from fleetllm.sched.request import Request

logger = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT_MS = 60_000
IDLE_POLL_MS = 500  # how often an idle engine checks that its parent is alive
UTILITY_METHODS = frozenset({
    "reset_prefix_cache", "sleep", "wake_up", "is_sleeping", "collective_rpc", "stats",
    "get_performance_metrics", "save_sharded_state",
})


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
            try:
                self.core = EngineCore(config)
            except Exception as e:  # tell the front end why, then exit non-zero
                handshake.send(msgspec.msgpack.encode(
                    HandshakeStatus("FAILED", error=f"{type(e).__name__}: {e}")))
                raise
            self.input = ctx.socket(zmq.DEALER)
            self.input.setsockopt(zmq.IDENTITY, self.identity)
            self.input.connect(meta.addresses.inputs[0])
            self.input.send(b"")  # registers our identity with the front end's router
            self.output = ctx.socket(zmq.PUSH)
            self.output.setsockopt(zmq.LINGER, 1000)
            self.output.connect(meta.addresses.outputs[0])
            blocks = self.core.config.cache_config.num_gpu_blocks or 0
            handshake.send(msgspec.msgpack.encode(HandshakeStatus("READY", True, blocks)))
        finally:
            handshake.close()
        self.encoder = msgspec.msgpack.Encoder()
        self.request_decoder = msgspec.msgpack.Decoder(EngineCoreRequest)
        self.utility_decoder = msgspec.msgpack.Decoder(UtilityCall)
        self.parent = os.getppid()

    @staticmethod
    def run_engine_core(config: EngineConfig, handshake_address: str, dp_rank: int = 0,
                        local_dp_rank: int = 0) -> None:
        """Process entry point."""
        signal.signal(signal.SIGTERM, _raise_exit)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the front end decides
        logging.basicConfig(level=logging.INFO,
                            format=f"%(levelname)s engine{dp_rank} %(name)s: %(message)s")
        ctx = zmq.Context()
        proc = None
        try:
            proc = EngineCoreProc(config, handshake_address, dp_rank, ctx)
            proc.run_busy_loop()
        finally:
            if proc is not None:
                proc.close()
            ctx.destroy(linger=0)

    def run_busy_loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self.input, zmq.POLLIN)
        while True:
            busy = self.core.has_unfinished_requests()
            if not dict(poller.poll(0 if busy else IDLE_POLL_MS)):
                if not busy:
                    if os.getppid() != self.parent:
                        logger.info("front end is gone; exiting")
                        return
                    continue
            else:
                while self.input.poll(0):
                    if not self._handle(self.input.recv_multipart()):
                        return
            if self.core.has_unfinished_requests():
                try:
                    outputs = self.core.step()
                except Exception as e:  # the engine cannot go on; say so, then exit
                    logger.exception("engine step failed")
                    self._send(EngineCoreOutputs(self.engine_index,
                                                 engine_dead=f"{type(e).__name__}: {e}"))
                    raise
                self._send(EngineCoreOutputs(self.engine_index, outputs,
                                             stats=self.core.stats()))

    def _handle(self, frames: list[bytes]) -> bool:
        kind, payload = EngineCoreRequestType(frames[0]), frames[1]
        if kind == EngineCoreRequestType.ADD:
            r = self.request_decoder.decode(payload)
            self.core.add_request(Request(r.request_id, r.prompt_token_ids, r.sampling_params,
                                          tuple(r.eos_token_ids), r.cache_salt))
        elif kind == EngineCoreRequestType.ABORT:
            self.core.abort_requests(msgspec.msgpack.decode(payload, type=list[str]))
        else:
            call = self.utility_decoder.decode(payload)
            if call.method == "shutdown":
                return False
            self._send(EngineCoreOutputs(self.engine_index, utility_results=[
                self._utility(call)], stats=self.core.stats()))
        return True

    def _utility(self, call: UtilityCall) -> UtilityResult:
        if call.method not in UTILITY_METHODS:
            return UtilityResult(call.call_id, error=f"unknown utility method {call.method!r}")
        try:
            return UtilityResult(call.call_id, getattr(self.core, call.method)(*call.args))
        except Exception as e:
            return UtilityResult(call.call_id, error=f"{type(e).__name__}: {e}")

    def _send(self, outputs: EngineCoreOutputs) -> None:
        self.output.send(self.encoder.encode(outputs), copy=False)

    def close(self) -> None:
        try:
            self.core.shutdown()
        finally:
            self.input.close(linger=0)
            self.output.close(linger=1000)


def _raise_exit(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # let the cleanup finish
    raise SystemExit(128 + signum)
