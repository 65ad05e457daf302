"""KVOutputAggregator: one kv_connector_output out of every worker's.

A request's transfer is finished only once every worker that holds a share of it (its
world size, or the connector's get_finished_count) has reported it: a rank that reports
early, or twice, cannot get the blocks freed while another rank still reads them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import msgspec

from fleetllm.distributed.kv_transfer.messages import KVConnectorOutput

logger = logging.getLogger(__name__)


class KVOutputAggregator:
    def __init__(self, expected_finished_count: int) -> None:
        if expected_finished_count < 1:
            raise ValueError(f"expected_finished_count={expected_finished_count} must be >= 1")
        self._expected = expected_finished_count
        # req id -> the ranks that reported it (a set: one rank reporting twice counts once)
        self._sending: dict[str, set[int]] = {}
        self._recving: dict[str, set[int]] = {}
        self._failed: set[str] = set()  # failed on some rank, not yet reported finished

    @property
    def expected_finished_count(self) -> int:
        return self._expected

    def pending(self) -> tuple[set[str], set[str]]:
        """Requests some, not all, ranks reported: (sending, recving)."""
        return set(self._sending), set(self._recving)

    def _count(self, req_ids: Sequence[str], rank: int, seen: dict[str, set[int]],
               done: list[str]) -> None:
        for req_id in req_ids:
            ranks = seen.setdefault(req_id, set())
            if rank in ranks:
                logger.warning("worker rank %d reported KV transfer of %s finished twice",
                               rank, req_id)
                continue
            ranks.add(rank)
            if len(ranks) >= self._expected:
                del seen[req_id]
                done.append(req_id)

    def aggregate(self, outputs: Sequence[Any], output_rank: int = 0) -> Any:
        """outputs: every rank's ModelRunnerOutput, by rank. Returns the output rank's, with
        the aggregated kv_connector_output (a copy: the rank's object is left as it is)."""
        sending: list[str] = []
        recving: list[str] = []
        total = KVConnectorOutput()
        for rank, out in enumerate(outputs):
            kv: KVConnectorOutput | None = getattr(out, "kv_connector_output", None)
            if kv is None:
                continue
            if kv.expected_finished_count and kv.expected_finished_count != self._expected:
                logger.debug("expected finished count %d -> %d", self._expected,
                             kv.expected_finished_count)
                self._expected = kv.expected_finished_count
            self._failed.update(kv.failed_recving)
            self._count(kv.finished_sending, rank, self._sending, sending)
            self._count(kv.finished_recving, rank, self._recving, recving)
            total.blocks_loaded += kv.blocks_loaded
            total.bytes_loaded += kv.bytes_loaded
            total.blocks_saved += kv.blocks_saved
            total.bytes_saved += kv.bytes_saved
        failed = [r for r in recving if r in self._failed]
        self._failed.difference_update(failed)
        total.finished_sending = sending
        total.finished_recving = recving
        total.failed_recving = failed
        total.expected_finished_count = self._expected
        return _with_kv_output(outputs[output_rank], total)


def _with_kv_output(out: Any, kv: KVConnectorOutput) -> Any:
    if isinstance(out, msgspec.Struct):
        if "kv_connector_output" not in out.__struct_fields__:
            return out
        return msgspec.structs.replace(out, kv_connector_output=kv)
    out.kv_connector_output = kv
    return out
