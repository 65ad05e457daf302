"""KVConnectorBase_V1: vLLM v1's connector split, one object per side.

The scheduler side (in the engine process) decides what moves: get_num_new_matched_tokens,
update_state_after_alloc, build_connector_meta (carried in SchedulerOutput) and
request_finished. The worker side (one per rank, holding that rank's heads) moves it:
start_load_kv, wait_for_layer_load and save_kv_layer (called from each attention layer
through the model runner), wait_for_save, and get_finished, whose answer travels back in
ModelRunnerOutput.kv_connector_output and is counted across ranks by KVOutputAggregator.
"""

from __future__ import annotations

import enum
import hashlib
from abc import ABC, abstractmethod
from array import array
from typing import TYPE_CHECKING, Any

from fleetllm.distributed.kv_transfer.config import KVTransferConfig
from fleetllm.distributed.kv_transfer.identity import KVLayout, local_layout
from fleetllm.distributed.kv_transfer.messages import KVConnectorMetadata, KVConnectorOutput

if TYPE_CHECKING:
    import torch

    from fleetllm.config import EngineConfig
    from fleetllm.sched.output import SchedulerOutput
    from fleetllm.sched.request import Request

KVCaches = dict[int, tuple["torch.Tensor", "torch.Tensor"]]  # layer -> (K, V) paged caches


class KVConnectorRole(enum.Enum):
    SCHEDULER = 0
    WORKER = 1


def aligned_prompt_tokens(num_tokens: int, block_size: int) -> int:
    """The full blocks a connector moves: never the last token, which the consumer
    computes itself to get its logits (as the prefix cache leaves one token too)."""
    return max(num_tokens - 1, 0) // block_size * block_size


def lora_tag(request: Request) -> str:
    lora = getattr(request, "lora_request", None)
    if lora is None:
        return ""
    return f"lora:{lora.lora_int_id}:{lora.lora_name}:{lora.lora_path}"


def token_hash(token_ids: list[int], tag: str = "") -> str:
    """The name of a prefix's KV: sha256 of its token ids and its adapter tag."""
    h = hashlib.sha256(tag.encode())
    h.update(b"\0")
    h.update(array("q", token_ids).tobytes())
    return h.hexdigest()


def kv_transfer_params(request: Request) -> dict[str, Any]:
    params = getattr(request, "kv_transfer_params", None)
    if params is None:
        extra = getattr(request.sampling_params, "extra_args", None) or {}
        params = extra.get("kv_transfer_params")
    return params if isinstance(params, dict) else {}


class KVConnectorBase_V1(ABC):  # noqa: N801 - vLLM's name
    def __init__(self, config: EngineConfig, role: KVConnectorRole, rank: int = 0) -> None:
        kv = config.kv_transfer_config
        assert kv is not None, "a KV connector needs EngineConfig.kv_transfer_config"
        self.config = config
        self.kv_config: KVTransferConfig = kv
        self.role = role
        self.rank = rank
        self.block_size = config.cache_config.block_size
        self.tp_size = config.parallel_config.tensor_parallel_size
        self._metadata: KVConnectorMetadata | None = None
        self.kv_caches: KVCaches = {}
        self._layout: KVLayout | None = None
        self.failed_recving: set[str] = set()
        self.counters = KVConnectorOutput()

    @classmethod  # noqa: B027 - optional hook
    def validate_config(cls, kv_config: KVTransferConfig) -> None:
        """Raises ConfigurationError naming what to change (before any engine starts)."""

    def get_finished_count(self) -> int | None:
        """How many worker reports finish a request; None: every rank's."""
        return None

    # ---- worker side --------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: KVCaches) -> None:
        self.kv_caches = kv_caches

    def layout(self) -> KVLayout:
        """This rank's KV layout (dtype, heads, block shape, layers), from its caches."""
        if self._layout is None:
            k, _ = next(iter(self.kv_caches.values()))
            self._layout = local_layout(self.config, k.shape[2], list(self.kv_caches))
        return self._layout

    def bind_connector_metadata(self, metadata: KVConnectorMetadata) -> None:
        self._metadata = metadata

    def clear_connector_metadata(self) -> None:
        self._metadata = None

    def get_connector_metadata(self) -> KVConnectorMetadata:
        assert self._metadata is not None, "no connector metadata bound for this step"
        return self._metadata

    @abstractmethod
    def start_load_kv(self) -> None:
        """Starts (or does) this step's loads into the paged KV cache."""

    def wait_for_layer_load(self, layer: int) -> None:  # noqa: B027 - optional hook
        """Blocks until layer's loads are in place (a no-op when start_load_kv loaded all)."""

    @abstractmethod
    def save_kv_layer(self, layer: int, kv_layer: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Called after layer's attention wrote this step's K/V into kv_layer."""

    @abstractmethod
    def wait_for_save(self) -> None:
        """Called after the forward pass: saves are done, or handed to a sender."""

    @abstractmethod
    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None,
                                                                 set[str] | None]:
        """(finished_sending, finished_recving) on this rank since the last call."""

    def build_output(self, finished_req_ids: set[str]) -> KVConnectorOutput:
        """get_finished and the counters, as the step's kv_connector_output."""
        sending, recving = self.get_finished(finished_req_ids)
        failed = self.failed_recving & (recving or set())
        self.failed_recving -= failed
        out, self.counters = self.counters, KVConnectorOutput()
        out.finished_sending = sorted(sending or ())
        out.finished_recving = sorted(recving or ())
        out.failed_recving = sorted(failed)
        out.expected_finished_count = self.get_finished_count() or 0
        return out

    def shutdown(self) -> None:  # noqa: B027 - optional hook
        """Ends threads and closes sockets (every path)."""

    # ---- scheduler side -----------------------------------------------------------------
    @abstractmethod
    def get_num_new_matched_tokens(self, request: Request,
                                   num_computed_tokens: int) -> tuple[int | None, bool]:
        """(tokens beyond num_computed_tokens the connector can provide, load_async); None:
        not known yet, ask again next step."""

    @abstractmethod
    def update_state_after_alloc(self, request: Request, block_ids: list[int],
                                 num_external_tokens: int) -> None:
        """The request's blocks (all of them) are allocated; num_external_tokens will be
        loaded into them after its num_computed_tokens."""

    @abstractmethod
    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        """This step's loads and saves; resets the per-step state."""

    def update_connector_output(self, output: KVConnectorOutput) -> None:  # noqa: B027
        """The step's aggregated kv_connector_output, seen by the scheduler side."""

    def request_finished(self, request: Request,
                         block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """(delay_free_blocks, kv_transfer_params): True keeps the blocks until every worker
        reports the request in finished_sending."""
        return False, None
