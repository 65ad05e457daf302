"""The plain data that crosses the Executor boundary (typed, msgspec-serialisable)."""

from __future__ import annotations

import msgspec

from fleetllm.distributed.kv_transfer.messages import KVConnectorMetadata, KVConnectorOutput
from fleetllm.lora.request import LoRARequest
from fleetllm.sampling_params import SamplingParams


class NewRequestData(msgspec.Struct, array_like=True):
    """A request the workers have not seen (or are seeing again after preemption)."""

    req_id: str
    token_ids: list[int]  # prompt plus any output already produced
    num_prompt_tokens: int
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    eos_token_ids: list[int]
    lora_request: LoRARequest | None = None


class CachedRequestData(msgspec.Struct, array_like=True):
    """Requests the workers already hold: what changed since the previous step."""

    req_ids: list[str] = msgspec.field(default_factory=list)
    new_token_ids: list[list[int]] = msgspec.field(default_factory=list)
    new_block_ids: list[list[int]] = msgspec.field(default_factory=list)
    num_computed_tokens: list[int] = msgspec.field(default_factory=list)


class SchedulerOutput(msgspec.Struct, array_like=True):
    scheduled_new_reqs: list[NewRequestData]
    scheduled_cached_reqs: CachedRequestData
    num_scheduled_tokens: dict[str, int]
    total_num_scheduled_tokens: int
    finished_req_ids: list[str]
    # Structured outputs: the requests that sample this step under a grammar, and their
    # allowed-token bitmask, one row each in that order: ceil(vocab_size / 32) little-endian
    # int32 words, bit t % 32 of word t // 32 set when token t is allowed.
    structured_output_request_ids: list[str] = msgspec.field(default_factory=list)
    grammar_bitmask: bytes = b""
    # Speculative decoding: the draft tokens verified in this step, after each request's
    # known tokens (counted in num_scheduled_tokens, with KV slots).
    scheduled_spec_decode_tokens: dict[str, list[int]] = msgspec.field(default_factory=dict)
    # A KV connector's loads and saves in this step (None: no connector).
    kv_connector_metadata: KVConnectorMetadata | None = None

    @staticmethod
    def empty(finished_req_ids: list[str] | None = None) -> SchedulerOutput:
        return SchedulerOutput([], CachedRequestData(), {}, 0, finished_req_ids or [])


class LogprobsLists(msgspec.Struct, array_like=True):
    """Per sampled token: the sampled id first, then the top-N ids, with their logprobs."""

    logprob_token_ids: list[list[int]]
    logprobs: list[list[float]]
    sampled_token_ranks: list[int]
    # Speculative decoding: one row per emitted token; request i's rows are
    # cu_num_tokens[i]:cu_num_tokens[i + 1]. None: one row per request.
    cu_num_tokens: list[int] | None = None


class PromptLogprobs(msgspec.Struct, array_like=True):
    """Logprobs of prompt positions start+1 .. start+len given the tokens before them: the
    prompt token's own logprob and rank, and the top-k ids and logprobs at each position."""

    start: int
    token_logprobs: list[float]
    ranks: list[int]
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]


class ModelRunnerOutput(msgspec.Struct, array_like=True):
    req_ids: list[str]
    req_id_to_index: dict[str, int]
    sampled_token_ids: list[list[int]]  # empty list: a prefill chunk that did not finish
    logprobs: LogprobsLists | None = None
    prompt_logprobs: dict[str, PromptLogprobs] = msgspec.field(default_factory=dict)
    # A KV connector's finished transfers (aggregated over the ranks by the executor).
    kv_connector_output: KVConnectorOutput | None = None


EMPTY_MODEL_RUNNER_OUTPUT = ModelRunnerOutput([], {}, [])


class DraftTokenIds(msgspec.Struct, array_like=True):
    """The output rank's proposals for the next step (Executor.take_draft_token_ids)."""

    req_ids: list[str]
    draft_token_ids: list[list[int]]


class EngineCoreOutput(msgspec.Struct, array_like=True, omit_defaults=True):
    request_id: str
    new_token_ids: list[int]
    # one entry per new token: (token ids, logprobs, rank of the sampled token)
    new_logprobs: list[tuple[list[int], list[float], int]] | None = None
    prompt_logprobs: PromptLogprobs | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    error: str | None = None  # with finish_reason "error": what failed and what to change

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class KVCacheSpec(msgspec.Struct, array_like=True, frozen=True):
    """One attention layer's cache on one worker."""

    block_size: int
    num_kv_heads: int
    head_size: int
    dtype: str

    @property
    def page_size_bytes(self) -> int:
        itemsize = 4 if self.dtype == "float32" else 2
        return 2 * self.block_size * self.num_kv_heads * self.head_size * itemsize


class KVCacheConfig(msgspec.Struct, array_like=True):
    num_blocks: int
    layer_names: list[str]
