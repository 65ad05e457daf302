"""A request as the scheduler tracks it."""

from __future__ import annotations

import enum
import hashlib
from array import array

from fleetllm.lora.request import LoRARequest
from fleetllm.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    WAITING_FOR_REMOTE_KVS = enum.auto()  # a KV connector is loading its prompt's KV
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH = enum.auto()
    FINISHED_ABORTED = enum.auto()
    FINISHED_ERROR = enum.auto()  # failed alone (e.g. it cannot fit in memory even by itself)

    @property
    def finish_reason(self) -> str | None:
        return {
            RequestStatus.FINISHED_STOPPED: "stop",
            RequestStatus.FINISHED_LENGTH: "length",
            RequestStatus.FINISHED_ABORTED: "abort",
            RequestStatus.FINISHED_ERROR: "error",
        }.get(self)


def hash_block(parent: bytes, token_ids: list[int]) -> bytes:
    """Collision-resistant key of a full block: sha256(parent hash + token ids)."""
    return hashlib.sha256(parent + array("q", token_ids).tobytes()).digest()


class Request:
    def __init__(self, request_id: str, prompt_token_ids: list[int],
                 sampling_params: SamplingParams, eos_token_ids: tuple[int, ...] = (),
                 cache_salt: str | None = "", output_token_ids: list[int] | None = None,
                 lora_request: LoRARequest | None = None) -> None:
        self.request_id = request_id
        self.lora_request = lora_request
        self.sampling_params = sampling_params
        self.eos_token_ids = eos_token_ids
        self.num_prompt_tokens = len(prompt_token_ids)
        # output_token_ids: tokens already produced (a request resumed on another engine),
        # recomputed as a preempted request's are; max_tokens and seeds count them.
        self.all_token_ids: list[int] = [*prompt_token_ids, *(output_token_ids or ())]
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.num_cached_tokens = -1  # set when first scheduled
        self.num_sent_tokens = 0  # how many token ids the workers have been told about
        # async scheduling: steps in flight whose sampled token is not back yet
        self.num_output_placeholders = 0
        # None: this request's blocks are never shared; otherwise only with equal salts.
        self.cache_salt = cache_salt
        self.block_hashes: list[bytes] = []
        self.stop_reason: int | str | None = None
        # Speculative decoding: the worker's drafts, verified in the next step (then cleared).
        self.spec_token_ids: list[int] = []
        # The copies of one n > 1 request ("{k}_{request id}", engine/inputs.py) form a
        # group, whose share of the running slots the scheduler bounds.
        self.group = request_id.partition("_")[2] if sampling_params.n > 1 else None

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[self.num_prompt_tokens:]

    @property
    def is_finished(self) -> bool:
        return self.status.finish_reason is not None

    def update_block_hashes(self, block_size: int) -> list[bytes]:
        """Extends the hash chain over every full block of known tokens."""
        if self.cache_salt is None:
            return self.block_hashes
        hashes = self.block_hashes
        while (len(hashes) + 1) * block_size <= self.num_tokens:
            start = len(hashes) * block_size
            parent = hashes[-1] if hashes else self._hash_root()
            hashes.append(hash_block(parent, self.all_token_ids[start:start + block_size]))
        return hashes

    @property
    def lora_int_id(self) -> int:
        return 0 if self.lora_request is None else self.lora_request.lora_int_id

    def _hash_root(self) -> bytes:
        """The first block's parent: the salt, and the adapter (the same tokens under
        another adapter have other KV)."""
        lora = self.lora_request
        if lora is None:
            return self.cache_salt.encode()
        return (f"{self.cache_salt}\0lora\0{lora.lora_int_id}\0{lora.lora_name}\0"
                f"{lora.lora_path}").encode()

    def check_stop(self, token_id: int, max_model_len: int) -> bool:
        """Sets the finished status after token_id was appended; True if finished."""
        params = self.sampling_params
        if self.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and token_id in self.eos_token_ids:
                self.status = RequestStatus.FINISHED_STOPPED
                return True
            if token_id in params.stop_token_ids:
                self.status = RequestStatus.FINISHED_STOPPED
                self.stop_reason = token_id
                return True
        if (params.max_tokens is not None and self.num_output_tokens >= params.max_tokens) or (
            self.num_tokens >= max_model_len
        ):
            self.status = RequestStatus.FINISHED_LENGTH
            return True
        return False
