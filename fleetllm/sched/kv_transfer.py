"""The scheduler's side of a KV connector: requests waiting for their KV, and finished
requests whose blocks are held until their KV has been sent.

A request whose prompt KV the connector can provide gets its blocks now (the local prefix
hit held, the rest taken from the pool but not yet hashed, so no other request can share
a block before its KV is there) and waits in WAITING_FOR_REMOTE_KVS while every worker
loads its share. Once all have, the loaded blocks join the prefix cache and the request
goes back to the front of the queue: its normal admission finds them as a prefix hit, so
it computes only the rest, and num_cached_tokens counts the loaded tokens. A failed load
hashes nothing: the request is recomputed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fleetllm.errors import ConfigurationError
from fleetllm.sched.kv_cache_manager import KVCacheBlock, KVCacheManager, cdiv
from fleetllm.sched.request import Request, RequestStatus

if TYPE_CHECKING:
    from fleetllm.config import EngineConfig
    from fleetllm.distributed.kv_transfer.base import KVConnectorBase_V1
    from fleetllm.distributed.kv_transfer.messages import KVConnectorOutput

logger = logging.getLogger(__name__)


def make_kv_transfer(config: EngineConfig) -> KVTransferScheduling | None:
    """The scheduler side of config's KV connector; None without one."""
    if config.kv_transfer_config is None:
        return None
    from fleetllm.distributed.kv_transfer.base import KVConnectorRole
    from fleetllm.distributed.kv_transfer.factory import KVConnectorFactory

    if config.parallel_config.pipeline_parallel_size > 1 or (
            config.scheduler_config.async_scheduling):
        raise ConfigurationError(
            "kv_transfer_config does not work with pipeline_parallel_size > 1 or "
            "async_scheduling yet (steps that only load KV would be skipped); use "
            "tensor_parallel_size, or drop the KV connector")
    if not config.cache_config.enable_prefix_caching:
        raise ConfigurationError(
            "kv_transfer_config needs enable_prefix_caching=True: loaded blocks join the "
            "prefix cache, which is how a request finds them")
    return KVTransferScheduling(
        KVConnectorFactory.create_connector(config, KVConnectorRole.SCHEDULER))


@dataclass
class _Loading:
    req: Request
    held: list[KVCacheBlock]  # the local prefix hit
    new: list[KVCacheBlock]  # the blocks being loaded


class KVTransferScheduling:
    def __init__(self, connector: KVConnectorBase_V1) -> None:
        self.connector = connector
        self.loading: dict[str, _Loading] = {}
        self.delayed: dict[str, Request] = {}  # finished; blocks kept while being sent
        self.stats_counters = {"kv_connector_blocks_loaded": 0,
                               "kv_connector_bytes_loaded": 0,
                               "kv_connector_blocks_saved": 0,
                               "kv_connector_bytes_saved": 0,
                               "kv_connector_tokens_loaded": 0,
                               "kv_connector_loads_failed": 0}

    def has_work(self) -> bool:
        return bool(self.loading or self.delayed)

    @staticmethod
    def _local_hit(req: Request, kv: KVCacheManager) -> list[KVCacheBlock]:
        """get_computed_blocks without counting a prefix-cache query."""
        hits: list[KVCacheBlock] = []
        for h in req.update_block_hashes(kv.block_size)[:(req.num_tokens - 1) // kv.block_size]:
            block = kv.pool.cached.get(h)
            if block is None:
                break
            hits.append(block)
        return hits

    def start_load(self, req: Request, kv: KVCacheManager) -> bool:
        """At admission: True when the request now waits for its KV (the caller takes it
        out of the waiting queue); False: schedule it as usual."""
        if req.cache_salt is None or req.num_computed_tokens:
            return False
        held = self._local_hit(req, kv)
        num_hit = len(held) * kv.block_size
        num_external, _ = self.connector.get_num_new_matched_tokens(req, num_hit)
        if not num_external:
            return False
        need = cdiv(num_hit + num_external, kv.block_size) - len(held)
        reclaimed = sum(1 for b in held if b.ref_cnt == 0)
        if need > kv.pool.num_free_blocks - reclaimed:
            return False  # no room to load into: it computes its prompt instead
        kv.pool.touch(held)
        new = kv.pool.take(need)
        self.connector.update_state_after_alloc(req, [b.block_id for b in held + new],
                                                num_external)
        req.status = RequestStatus.WAITING_FOR_REMOTE_KVS
        self.loading[req.request_id] = _Loading(req, held, new)
        return True

    def _release(self, loading: _Loading, kv: KVCacheManager) -> None:
        kv.pool.release(reversed(loading.new))
        kv.pool.release(reversed(loading.held))

    def abort(self, req: Request, kv: KVCacheManager) -> bool:
        """A request that waits for its KV is finished: True if it was one."""
        loading = self.loading.pop(req.request_id, None)
        if loading is not None:
            self._release(loading, kv)
        return loading is not None

    def request_finished(self, req: Request, kv: KVCacheManager) -> bool:
        """True: the request's blocks stay until every worker has sent its KV."""
        delay, _ = self.connector.request_finished(req, kv.block_ids(req))
        if delay:
            self.delayed[req.request_id] = req
        return delay

    def on_output(self, out: KVConnectorOutput, kv: KVCacheManager) -> list[Request]:
        """Applies a step's aggregated kv_connector_output; returns the requests whose
        loads ended (successful or not), to go back to the front of the queue."""
        c = self.stats_counters
        c["kv_connector_blocks_loaded"] += out.blocks_loaded
        c["kv_connector_bytes_loaded"] += out.bytes_loaded
        c["kv_connector_blocks_saved"] += out.blocks_saved
        c["kv_connector_bytes_saved"] += out.bytes_saved
        self.connector.update_connector_output(out)
        for req_id in out.finished_sending:
            req = self.delayed.pop(req_id, None)
            if req is not None:
                kv.free(req)
        failed = set(out.failed_recving)
        back = []
        for req_id in out.finished_recving:
            loading = self.loading.pop(req_id, None)
            if loading is None:
                continue  # aborted while loading
            req = loading.req
            if req_id in failed:
                c["kv_connector_loads_failed"] += 1
            else:
                hashes = req.update_block_hashes(kv.block_size)
                for i, block in enumerate(loading.new, start=len(loading.held)):
                    block.block_hash = hashes[i]
                    kv.pool.cached.setdefault(hashes[i], block)
                c["kv_connector_tokens_loaded"] += len(loading.new) * kv.block_size
            self._release(loading, kv)
            req.status = RequestStatus.WAITING
            back.append(req)
        return back

    def reset(self, kv: KVCacheManager) -> list[Request]:
        """The workers were replaced: no load or send will report. Held blocks go back;
        returns the requests that were loading (they recompute)."""
        back = [loading.req for loading in self.loading.values()]
        for loading in self.loading.values():
            self._release(loading, kv)
            loading.req.status = RequestStatus.WAITING
        self.loading.clear()
        for req in self.delayed.values():
            kv.free(req)
        self.delayed.clear()
        forget = getattr(self.connector, "forget_sending", None)
        if forget is not None:
            forget()
        return back

    def stats(self) -> dict[str, int]:
        return {**self.stats_counters, "num_waiting_for_remote_kvs": len(self.loading)}
