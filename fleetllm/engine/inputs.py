"""Turning a user's prompt and SamplingParams into typed engine requests, the same way for the
offline LLM and the server: defaults, checks that say what to change, n > 1 copies."""

from __future__ import annotations

from typing import Any

from fleetllm.config import EngineConfig
from fleetllm.engine.messages import EngineCoreRequest
from fleetllm.lora.request import LoRARequest
from fleetllm.sampling_params import SamplingParams

_GENERATION_DEFAULTS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def generation_defaults(config: EngineConfig) -> dict[str, Any]:
    """The checkpoint's generation_config.json sampling values (as vLLM applies them)."""
    gen = config.model_config.generation_config
    defaults = {k: gen[k] for k in _GENERATION_DEFAULTS if gen.get(k) is not None}
    if gen.get("do_sample") is False:
        defaults["temperature"] = 0.0
    return defaults


def check_prompt(config: EngineConfig, ids: list[int], what: str = "the prompt") -> None:
    """Raises ValueError naming the problem, before anything reaches the engine."""
    if not ids:
        raise ValueError(f"{what} is empty; give at least one token")
    vocab = config.model_config.vocab_size
    bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab]
    if bad:
        raise ValueError(f"{what} has token ids outside [0, {vocab}): {bad[:5]}")
    max_len = config.scheduler_config.max_model_len
    if len(ids) >= max_len:
        raise ValueError(
            f"{what} has {len(ids)} tokens, which leaves no room to generate within "
            f"max_model_len={max_len}; shorten the prompt or raise max_model_len")


def check_params(config: EngineConfig, params: SamplingParams) -> None:
    """What SamplingParams cannot check alone: limits of this engine and its vocabulary.
    Structured-output specs are built into grammars here (no tokenizer needed), so a bad
    schema, regex or grammar raises before anything is queued."""
    if not isinstance(params, SamplingParams):
        raise TypeError(f"sampling_params must be SamplingParams, got {type(params)}")
    vocab = config.model_config.vocab_size
    if params.logit_bias:
        bad = sorted(t for t in params.logit_bias if t >= vocab)
        if bad:
            raise ValueError(f"logit_bias has token ids outside the vocabulary [0, {vocab}): "
                             f"{bad[:5]}")
    if params.structured_outputs is not None:
        from fleetllm.structured.grammar import to_grammar
        from fleetllm.structured.manager import check_engine_supports

        check_engine_supports(config)
        to_grammar(params.structured_outputs)
    max_lp = config.model_config.max_logprobs
    for name in ("logprobs", "prompt_logprobs"):
        value = getattr(params, name)
        if value is not None and value > max_lp:
            raise ValueError(f"{name}={value} is more than this engine returns "
                             f"(max_logprobs={max_lp}); ask for fewer or create the engine "
                             "with a larger max_logprobs")


def child_request_ids(request_id: str, n: int) -> list[str]:
    return [request_id] if n == 1 else [f"{i}_{request_id}" for i in range(n)]


def check_lora(config: EngineConfig, lora_request: Any, what: str = "lora_request") -> None:
    """A request's adapter: a LoRARequest, on an engine created with enable_lora=True."""
    if lora_request is None:
        return
    if not isinstance(lora_request, LoRARequest):
        raise TypeError(f"{what} must be a fleetllm.lora.request.LoRARequest or None, got "
                        f"{type(lora_request).__name__}")
    if config.lora_config is None:
        raise ValueError(f"{what} {lora_request.lora_name!r} needs an engine created with "
                         "enable_lora=True (--enable-lora)")


def make_requests(config: EngineConfig, request_id: str, ids: list[int],
                  params: SamplingParams, eos_token_ids: tuple[int, ...],
                  lora_request: LoRARequest | None = None) -> list[EngineCoreRequest]:
    """The typed engine requests, built once here at the front end: one per completion;
    copy k of a seeded n > 1 request uses seed + k. The adapter travels as one field."""
    # Prompt logprobs need every prompt position computed, so no prefix-cache hits;
    # without prefix caching, the n copies still share their prompt's blocks.
    if params.prompt_logprobs is not None:
        salt = None
    elif config.cache_config.enable_prefix_caching:
        salt = ""
    else:
        salt = f"request:{request_id}" if params.n > 1 else None
    requests = []
    for i, child_id in enumerate(child_request_ids(request_id, params.n)):
        child_params = params
        if params.n > 1 and params.seed is not None:
            child_params = params.clone(seed=params.seed + i)
        requests.append(EngineCoreRequest(child_id, ids, child_params, list(eos_token_ids),
                                          salt, lora_request=lora_request))
    return requests
