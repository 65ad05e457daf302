"""KV connectors: moving KV blocks in and out of an engine (disaggregated prefill, disk).

Importing this package loads no connector (and no torch); KVConnectorFactory imports the
one a KVTransferConfig names.
"""

from fleetllm.distributed.kv_transfer.aggregator import KVOutputAggregator
from fleetllm.distributed.kv_transfer.config import KVTransferConfig
from fleetllm.distributed.kv_transfer.factory import KVConnectorFactory
from fleetllm.distributed.kv_transfer.messages import (
    KVConnectorMetadata,
    KVConnectorOutput,
    KVTransferRequest,
)

__all__ = ["KVConnectorFactory", "KVConnectorMetadata", "KVConnectorOutput",
           "KVOutputAggregator", "KVTransferConfig", "KVTransferRequest"]
