"""Typed messages between front ends and engine-core processes (msgspec; no pickle).

Frames on the input socket: [request type, payload]; on the output socket: one
EngineCoreOutputs. The start-up handshake uses HandshakeStatus and EngineHandshakeMetadata.
Whoever owns the engine processes reports their deaths and restarts as EngineEvents.
"""

from __future__ import annotations

import enum
from typing import Any

import msgspec

from fleetllm.lora.request import LoRARequest
from fleetllm.sampling_params import SamplingParams
from fleetllm.sched.output import EngineCoreOutput


class EngineCoreRequestType(bytes, enum.Enum):
    ADD = b"\x00"
    ABORT = b"\x01"
    UTILITY = b"\x02"


class EngineCoreRequest(msgspec.Struct, array_like=True):
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: list[int]
    cache_salt: str | None = ""
    # Tokens the request already produced elsewhere (it is resumed after an engine died);
    # the engine recomputes them and goes on from there.
    output_token_ids: list[int] = msgspec.field(default_factory=list)
    lora_request: LoRARequest | None = None  # None: the base model


class UtilityCall(msgspec.Struct, array_like=True):
    """A call of an EngineCore method (reset_prefix_cache, sleep, collective_rpc, ...)."""

    call_id: int
    method: str
    args: list[Any] = msgspec.field(default_factory=list)


class UtilityResult(msgspec.Struct, array_like=True):
    call_id: int
    result: Any = None
    error: str | None = None


class EngineCoreOutputs(msgspec.Struct, array_like=True, omit_defaults=True):
    engine_index: int = 0
    outputs: list[EngineCoreOutput] = msgspec.field(default_factory=list)
    utility_results: list[UtilityResult] = msgspec.field(default_factory=list)
    # the scheduler's counts, for load balancing and metrics
    stats: dict[str, float] = msgspec.field(default_factory=dict)
    # set when the engine hit an unrecoverable error; the front end fails its requests
    engine_dead: str | None = None
    # which start of this engine index sent it (0 first, +1 per restart), so a front end
    # can drop what a dead predecessor sent after its requests were re-sent elsewhere
    epoch: int = 0


class EngineZmqAddresses(msgspec.Struct, array_like=True):
    inputs: list[str]
    outputs: list[str]
    coordinator_input: str | None = None
    coordinator_output: str | None = None
    # TCP endpoints of the same client sockets, for engines on other nodes (a client binds
    # both); empty when every engine runs on the front end's node.
    remote_inputs: list[str] = msgspec.field(default_factory=list)
    remote_outputs: list[str] = msgspec.field(default_factory=list)

    def for_engine(self, remote: bool) -> EngineZmqAddresses:
        """The addresses an engine connects to: TCP for one on another node (by node id,
        not IP: nodes may share an IP), ipc for one on this node."""
        if not remote or not self.remote_inputs:
            return self
        return EngineZmqAddresses(self.remote_inputs, self.remote_outputs,
                                  self.coordinator_input, self.coordinator_output)


class EngineHandshakeMetadata(msgspec.Struct, array_like=True):
    addresses: EngineZmqAddresses
    parallel_config: dict[str, int | str]
    epoch: int = 0  # stamped on every EngineCoreOutputs the engine sends


class EngineEvent(msgspec.Struct, array_like=True):
    """An engine core ended or came back, as its owner (the front end's manager, or the
    supervisor over a pipe) reports it.

    "dead": engine `index` ended (`detail` says how); `restarting` if a new one is being
    started, else the engine is gone for good (index -1: all of them).
    "ready": the new engine for `index` finished the handshake; its outputs carry `epoch`.
    "gone": the restart of engine `index` failed (say no node has room for it): the others
    serve without it; with none left, the engine is dead.
    """

    kind: str  # "dead" | "ready" | "gone"
    index: int
    detail: str = ""
    restarting: bool = False
    epoch: int = 0

    @property
    def final(self) -> bool:
        return self.kind == "dead" and not self.restarting


class HandshakeStatus(msgspec.Struct):
    status: str  # "HELLO" | "READY" | "FAILED"
    local: bool = True
    num_gpu_blocks: int = 0
    error: str | None = None
