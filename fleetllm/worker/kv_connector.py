"""A worker's KV connector around each step: loads before the forward pass, per-layer
saves inside it (the attention layers call save_kv_layer), and the finished transfers
attached to the step's ModelRunnerOutput as kv_connector_output."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec

from fleetllm.distributed.kv_transfer.base import KVConnectorBase_V1, KVConnectorRole
from fleetllm.distributed.kv_transfer.factory import KVConnectorFactory
from fleetllm.distributed.kv_transfer.messages import KVConnectorMetadata

if TYPE_CHECKING:
    from fleetllm.config import EngineConfig
    from fleetllm.sched.output import ModelRunnerOutput, SchedulerOutput

# An empty step (only loads to wait for) waits this long for KV to arrive, so an engine
# with nothing else to do does not spin.
IDLE_WAIT_S = 0.005
_NO_META = KVConnectorMetadata()


def attach_kv_connector(runner: Any, config: EngineConfig, rank: int) -> None:
    """Creates the rank's connector once, and (again after a KV cache rebuild) hands it
    the paged caches; runner.kv_connector stays None without a kv_transfer_config."""
    if config.kv_transfer_config is None:
        return
    if getattr(runner, "kv_connector", None) is None:
        runner.kv_connector = KVConnectorFactory.create_connector(
            config, KVConnectorRole.WORKER, rank)
    runner.kv_connector.register_kv_caches(runner.kv_caches)


def execute_with_connector(conn: KVConnectorBase_V1, so: SchedulerOutput,
                           execute: Callable[[SchedulerOutput], ModelRunnerOutput]
                           ) -> ModelRunnerOutput:
    conn.bind_connector_metadata(getattr(so, "kv_connector_metadata", None) or _NO_META)
    try:
        conn.start_load_kv()
        out = execute(so)
    finally:
        # Also after a failed step: a send that cannot happen is reported done, so its
        # blocks are freed.
        conn.wait_for_save()
    try:
        wait = getattr(conn, "wait_for_arrival", None)
        if so.total_num_scheduled_tokens == 0 and wait is not None:
            wait(IDLE_WAIT_S)
        kv_out = conn.build_output(set(so.finished_req_ids))
    finally:
        conn.clear_connector_metadata()
    return msgspec.structs.replace(out, kv_connector_output=kv_out)
