"""P2PZmqConnector: a prefill engine pushes finished prompts' KV to a decode engine.

The proxy gives both sides one transfer id in kv_transfer_params: the prefill request
carries {"do_remote_decode": true, "transfer_id": T} and the decode request
{"do_remote_prefill": true, "transfer_id": T}. When the prefill side has computed the
prompt's full blocks, each rank copies its heads out of the KV cache and a sender thread
pushes them to the same rank of the decode engine (tcp://remote_host:remote_port+rank).
The request's blocks stay held (delay_free_blocks) until every rank reports the send done
or given up (send_timeout_s), so they are never leaked. The decode request waits in
WAITING_FOR_REMOTE_KVS until every rank has its share; one not there within
recv_timeout_s, or not matching (tokens, model, dtype, layout), is recomputed.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import torch

from fleetllm.distributed.kv_transfer.base import (
    KVConnectorBase_V1,
    KVConnectorRole,
    aligned_prompt_tokens,
    kv_transfer_params,
    token_hash,
)
from fleetllm.distributed.kv_transfer.blocks import (
    gather_tokens,
    nbytes,
    scatter_tokens,
    token_slots,
)
from fleetllm.distributed.kv_transfer.messages import (
    KVConnectorMetadata,
    KVConnectorOutput,
    KVTransferRequest,
)
from fleetllm.distributed.kv_transfer.p2p_transport import (
    KVPushHeader,
    KVReceiver,
    KVSender,
    decode_frames,
    encode_frames,
)
from fleetllm.distributed.kv_transfer.tracker import RequestTracker
from fleetllm.errors import ConfigurationError

if TYPE_CHECKING:
    from fleetllm.config import EngineConfig
    from fleetllm.distributed.kv_transfer.config import KVTransferConfig
    from fleetllm.sched.output import SchedulerOutput
    from fleetllm.sched.request import Request

logger = logging.getLogger(__name__)
DEFAULTS = {"kv_host": "127.0.0.1", "kv_port": 14579, "remote_host": "127.0.0.1",
            "remote_port": 14579, "recv_timeout_s": 30.0, "send_timeout_s": 10.0,
            "mailbox_ttl_s": 120.0}


class P2PZmqConnector(KVConnectorBase_V1):
    def __init__(self, config: EngineConfig, role: KVConnectorRole, rank: int = 0) -> None:
        super().__init__(config, role, rank)
        opt = {k: self.kv_config.get_from_extra_config(k, v) for k, v in DEFAULTS.items()}
        self.opt = opt
        # scheduler side
        self.tracker = RequestTracker()
        self._params: dict[str, dict[str, Any]] = {}  # remote-decode requests' params
        self._tried: set[str] = set()  # remote-prefill requests already matched once
        self._loads: list[KVTransferRequest] = []
        self._matched: dict[str, KVTransferRequest] = {}
        self._sending: set[str] = set()  # saves issued, not yet reported by every rank
        # worker side
        self._saves: dict[str, list[torch.Tensor]] = {}
        self._pending: dict[str, tuple[KVTransferRequest, float]] = {}
        self.sender: KVSender | None = None
        self.receiver: KVReceiver | None = None
        if role == KVConnectorRole.WORKER:
            if self.kv_config.is_kv_producer:
                self.sender = KVSender(float(opt["send_timeout_s"]))
            if self.kv_config.is_kv_consumer:
                address = f"tcp://{opt['kv_host']}:{int(opt['kv_port']) + rank}"
                try:
                    self.receiver = KVReceiver(address, float(opt["mailbox_ttl_s"]))
                except OSError as e:
                    self.shutdown()
                    raise ConfigurationError(f"{e}; choose another kv_port in "
                                             "kv_connector_extra_config") from e

    @classmethod
    def validate_config(cls, kv_config: KVTransferConfig) -> None:
        extra = kv_config.kv_connector_extra_config
        if unknown := sorted(set(extra) - set(DEFAULTS) - {"model_id"}):
            raise ConfigurationError(f"P2PZmqConnector kv_connector_extra_config has unknown "
                                     f"keys {unknown}; known: {sorted(DEFAULTS)}")
        for key in ("kv_port", "remote_port"):
            port = extra.get(key, DEFAULTS[key])
            if not isinstance(port, int) or not 0 < port < 65536:
                raise ConfigurationError(f"P2PZmqConnector {key}={port!r} must be a TCP port")
        for key in ("recv_timeout_s", "send_timeout_s", "mailbox_ttl_s"):
            value = extra.get(key, DEFAULTS[key])
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ConfigurationError(f"P2PZmqConnector {key}={value!r} must be > 0 seconds")

    # ---- scheduler side -----------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Request,
                                   num_computed_tokens: int) -> tuple[int | None, bool]:
        params = kv_transfer_params(request)
        req_id = request.request_id
        if params.get("do_remote_decode") and self.kv_config.is_kv_producer:
            self._params[req_id] = params
        if not (params.get("do_remote_prefill") and self.kv_config.is_kv_consumer
                and params.get("transfer_id")) or req_id in self._tried:
            return 0, False
        tokens = request.all_token_ids[:request.num_prompt_tokens]
        n = aligned_prompt_tokens(len(tokens), self.block_size)
        if n <= num_computed_tokens:
            return 0, False
        self._matched[req_id] = KVTransferRequest(
            req_id, [], num_computed_tokens, n - num_computed_tokens,
            str(params["transfer_id"]), token_hash=token_hash(tokens[:n]))
        return n - num_computed_tokens, True

    def update_state_after_alloc(self, request: Request, block_ids: list[int],
                                 num_external_tokens: int) -> None:
        item = self._matched.pop(request.request_id, None)
        if item is not None and num_external_tokens:
            self._tried.add(request.request_id)
            item.block_ids = list(block_ids)
            self._loads.append(item)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = KVConnectorMetadata(load=self._loads)
        self._loads = []
        for t in self.tracker.update(scheduler_output):
            params = self._params.get(t.req_id)
            n = aligned_prompt_tokens(len(t.prompt_token_ids), self.block_size)
            if params is None or t.saved or n == 0 or t.num_computed_tokens < n:
                continue
            t.saved = True
            host = params.get("remote_host", self.opt["remote_host"])
            port = int(params.get("remote_port", self.opt["remote_port"]))
            meta.save.append(KVTransferRequest(
                t.req_id, t.block_ids[:n // self.block_size], 0, n,
                str(params["transfer_id"]), f"tcp://{host}:{port}",
                token_hash(t.prompt_token_ids[:n])))
            self._sending.add(t.req_id)
        return meta

    def update_connector_output(self, output: KVConnectorOutput) -> None:
        """The aggregated output: the requests whose sends every rank finished."""
        self._sending.difference_update(output.finished_sending)

    def request_finished(self, request: Request,
                         block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        req_id = request.request_id
        self.tracker.pop(req_id)
        self._params.pop(req_id, None)
        self._tried.discard(req_id)
        self._matched.pop(req_id, None)
        return req_id in self._sending, None

    def forget_sending(self) -> list[str]:
        """The workers were replaced: no send will ever report; returns those requests."""
        sending, self._sending = sorted(self._sending), set()
        return sending

    # ---- worker side --------------------------------------------------------------------
    def start_load_kv(self) -> None:
        self._saves = {}  # what a failed step gathered
        deadline = time.monotonic() + float(self.opt["recv_timeout_s"])
        for item in self.get_connector_metadata().load:
            self._pending[item.req_id] = (item, deadline)

    def save_kv_layer(self, layer: int, kv_layer: tuple[torch.Tensor, torch.Tensor]) -> None:
        meta = self._metadata
        if meta is None or not meta.save:
            return
        for item in meta.save:
            slots = token_slots(item.block_ids, 0, item.num_tokens, self.block_size,
                                kv_layer[0].device)
            self._saves.setdefault(item.req_id, []).extend(
                gather_tokens(c, slots) for c in kv_layer)

    def wait_for_save(self) -> None:
        meta = self._metadata
        saves, self._saves = self._saves, {}
        for item in meta.save if meta is not None else []:
            tensors = saves.get(item.req_id)
            if self.sender is None:
                continue
            if tensors is None or len(tensors) != 2 * len(self.kv_caches):
                self.sender.mark_done(item.req_id)  # nothing to send from a failed step
                continue
            host, _, port = item.peer.rpartition(":")
            header = KVPushHeader(item.key, self.rank, item.num_tokens, item.token_hash,
                                  self.layout())
            self.sender.send(item.req_id, f"{host}:{int(port) + self.rank}",
                             encode_frames(header, tensors))
            self.counters.blocks_saved += len(item.block_ids)
            self.counters.bytes_saved += sum(nbytes(t) for t in tensors)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None,
                                                                 set[str] | None]:
        sending = self.sender.take_done() if self.sender is not None else set()
        for req_id in finished_req_ids:  # aborted while waiting: its blocks may be reused
            self._pending.pop(req_id, None)
        recving: set[str] = set()
        now = time.monotonic()
        for req_id, (item, deadline) in list(self._pending.items()):
            frames = self.receiver.take(item.key) if self.receiver is not None else None
            if frames is None and now < deadline:
                continue
            del self._pending[req_id]
            recving.add(req_id)
            if frames is None:
                logger.warning("the KV of request %s (transfer %s) did not arrive within "
                               "%.1f s; recomputing it", req_id, item.key,
                               float(self.opt["recv_timeout_s"]))
                self.failed_recving.add(req_id)
                continue
            try:
                self._apply(item, frames)
            except Exception as e:  # noqa: BLE001 - any mismatch means recompute
                logger.warning("cannot use the KV received for request %s (%s: %s); "
                               "recomputing it", req_id, type(e).__name__, e)
                self.failed_recving.add(req_id)
        return sending or None, recving or None

    def _apply(self, item: KVTransferRequest, frames: list[Any]) -> None:
        k0, _ = next(iter(self.kv_caches.values()))
        header, tensors = decode_frames(frames, k0.dtype)
        if header.layout != self.layout():
            raise ValueError(f"sender layout {header.layout} is not this rank's "
                             f"{self.layout()}")
        if (header.num_tokens, header.token_hash) != (item.start + item.num_tokens,
                                                      item.token_hash):
            raise ValueError("the sender's prompt tokens differ from this request's")
        slots = token_slots(item.block_ids, item.start, item.num_tokens, self.block_size,
                            k0.device)
        rows = slice(item.start, item.start + item.num_tokens)
        for j, layer in enumerate(header.layout.layers):
            k_cache, v_cache = self.kv_caches[layer]
            scatter_tokens(k_cache, slots, tensors[2 * j][rows])
            scatter_tokens(v_cache, slots, tensors[2 * j + 1][rows])
            self.counters.bytes_loaded += 2 * nbytes(tensors[2 * j][rows])
        self.counters.blocks_loaded += -(-item.num_tokens // self.block_size)

    def wait_for_arrival(self, timeout: float) -> None:
        """An idle step's pause: until a KV message arrives (loads pending) or for timeout
        (sends in flight), so an engine with only transfers to wait for does not spin."""
        if self.receiver is not None and self._pending:
            self.receiver.wait(timeout)
        elif self.sender is not None and self.sender.in_flight:
            time.sleep(timeout)

    def shutdown(self) -> None:
        if self.sender is not None:
            self.sender.close()
            self.sender = None
        if self.receiver is not None:
            self.receiver.close()
            self.receiver = None
