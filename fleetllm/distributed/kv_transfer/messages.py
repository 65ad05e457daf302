"""The plain data a KV connector sends across the Executor boundary (msgspec, no torch):
the scheduler side's per-step metadata and the workers' KVConnectorOutput."""

from __future__ import annotations

import msgspec


class KVTransferRequest(msgspec.Struct, array_like=True, omit_defaults=True):
    """One request's KV to move this step: tokens [start, start + num_tokens) of the
    request live in block_ids (the request's blocks, from its first)."""

    req_id: str
    block_ids: list[int]
    start: int
    num_tokens: int
    key: str = ""  # the stored entry's name (SharedStorageConnector) or the transfer id
    peer: str = ""  # where to send (P2P producer): "tcp://host:port" of the decode rank 0
    token_hash: str = ""  # sha256 of the token ids moved: a mismatch means recompute


class KVConnectorMetadata(msgspec.Struct, array_like=True, omit_defaults=True):
    """Built by the scheduler side each step (build_connector_meta), read by every worker."""

    load: list[KVTransferRequest] = msgspec.field(default_factory=list)
    save: list[KVTransferRequest] = msgspec.field(default_factory=list)


class KVConnectorOutput(msgspec.Struct, array_like=True, omit_defaults=True):
    """One worker's (or, once aggregated, every worker's) finished transfers.

    finished_recving includes failed loads; failed_recving says which of them failed (the
    scheduler recomputes those). expected_finished_count lets a worker change how many
    reports make a request finished (0: keep the aggregator's)."""

    finished_sending: list[str] = msgspec.field(default_factory=list)
    finished_recving: list[str] = msgspec.field(default_factory=list)
    failed_recving: list[str] = msgspec.field(default_factory=list)
    expected_finished_count: int = 0
    # Counters since the last report, summed over workers: blocks and bytes moved.
    blocks_loaded: int = 0
    bytes_loaded: int = 0
    blocks_saved: int = 0
    bytes_saved: int = 0

    def is_empty(self) -> bool:
        return not (self.finished_sending or self.finished_recving or self.failed_recving
                    or self.blocks_loaded or self.blocks_saved)
