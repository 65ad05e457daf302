"""The offline LLM class, with vLLM's names."""

from __future__ import annotations

import itertools
import logging
import time
import weakref
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from fleetllm.config import EngineArgs
from fleetllm.engine.core import EngineCore
from fleetllm.engine.inputs import (
    check_lora,
    check_params,
    check_prompt,
    child_request_ids,
    generation_defaults,
    make_requests,
)
from fleetllm.engine.output import OutputProcessor, RequestOutput
from fleetllm.engine.protocol import EngineClientInterface, delegate_engine_methods
from fleetllm.engine.tokenizer import Tokenizer
from fleetllm.lora.request import LoRARequest
from fleetllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

PromptType = str | dict[str, Any]


@delegate_engine_methods
class LLM(EngineClientInterface):
    """Generates text from a local Hugging Face checkpoint.

    Keyword arguments mirror vLLM's: model, dtype, seed, max_model_len, block_size,
    enable_prefix_caching, load_format, max_num_seqs, max_num_batched_tokens,
    kv_cache_memory_bytes, tensor_parallel_size, pipeline_parallel_size,
    distributed_executor_backend, skip_tokenizer_init, device. The engine core runs in
    this process unless engine_process=True or data_parallel_size > 1 (one engine-core
    process each; data_parallel_backend="ray" makes them Ray actors).
    """

    def __init__(self, model: str | None = None, *, data_parallel_size: int = 1,
                 data_parallel_backend: str = "mp", engine_process: bool = False,
                 **kwargs: Any) -> None:
        fields = EngineArgs.__dataclass_fields__
        unknown = sorted(set(kwargs) - set(fields))
        if unknown:
            raise TypeError(f"LLM() got unknown argument(s) {unknown}; known: {sorted(fields)}")
        args = EngineArgs(model=model, **kwargs)
        config = args.create_engine_config()
        self.config = config
        mc = config.model_config
        self.tokenizer = None if mc.skip_tokenizer_init else Tokenizer(mc.model)
        if not isinstance(data_parallel_size, int) or data_parallel_size < 1:
            raise ValueError(f"data_parallel_size={data_parallel_size!r} must be an integer >= 1")
        if engine_process or data_parallel_size > 1 or data_parallel_backend != "mp":
            from fleetllm.engine.client import SyncMPClient

            self.engine_core = SyncMPClient(config, data_parallel_size, data_parallel_backend)
        else:
            self.engine_core = EngineCore(config)
        # An LLM dropped without shutdown() still releases its workers, processes and actors.
        # The finalizer holds the engine core's method, never this LLM, so it cannot keep it
        # alive; shutdown() runs it, so the engine is shut down once either way.
        self._finalizer = weakref.finalize(self, self.engine_core.shutdown)
        self.output_processor = OutputProcessor(self.tokenizer)
        self._counter = itertools.count()
        self._sleep_level: int | None = None  # set by sleep(), until the engine is awake

    # ---- generation -------------------------------------------------------------------
    def get_default_sampling_params(self) -> SamplingParams:
        return SamplingParams(**generation_defaults(self.config))

    def generate(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True,
                 lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None
                 ) -> list[RequestOutput]:
        """lora_request: one adapter for every prompt, or one (or None) per prompt."""
        self._check_awake()
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(f"got {len(params_list)} sampling_params for {len(prompts)} "
                                 "prompts; pass one, or one per prompt")
        if lora_request is None or isinstance(lora_request, LoRARequest):
            loras = [lora_request] * len(prompts)
        elif not isinstance(lora_request, (list, tuple)):
            raise TypeError("lora_request must be a LoRARequest, a list of them (None for the "
                            f"base model), or None; got {type(lora_request).__name__}")
        else:
            loras = list(lora_request)
            if len(loras) != len(prompts):
                raise ValueError(f"got {len(loras)} lora_requests for {len(prompts)} prompts; "
                                 "pass one, or one (or None) per prompt")
        # Validate everything before adding anything, so a bad prompt leaves no half-batch.
        inputs = [self._tokenize(p, i) for i, p in enumerate(prompts)]
        for params in params_list:
            check_params(self.config, params)
        for i, lora in enumerate(loras):
            check_lora(self.config, lora, f"lora_request {i}")
        # Load each adapter first: a bad one raises LoRAAdapterError with nothing queued.
        for lora in dict.fromkeys(lora for lora in loras if lora is not None):
            self.engine_core.add_lora(lora)
        request_ids = [self._add_request(text, ids, params, lora)
                       for (text, ids), params, lora in zip(inputs, params_list, loras)]
        return self._run(request_ids, use_tqdm)

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             sampling_params: SamplingParams | None = None, use_tqdm: bool = True,
             add_generation_prompt: bool = True,
             lora_request: LoRARequest | None = None) -> list[RequestOutput]:
        self._check_awake()
        tok = self._require_tokenizer()
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = []
        for conv in conversations:
            text = tok.apply_chat_template(conv, add_generation_prompt=add_generation_prompt)
            prompts.append({"prompt": text, "prompt_token_ids": tok.encode(
                text, add_special_tokens=False)})
        return self.generate(prompts, sampling_params, use_tqdm, lora_request)

    def _check_awake(self) -> None:
        """A sleeping engine has no KV cache (nor weights, at level 2): fail before anything
        is queued rather than deep in a step."""
        if self._sleep_level is None:
            return
        if not self.engine_core.is_sleeping():  # woken up tag by tag, or by another caller
            self._sleep_level = None
            return
        raise RuntimeError(f"the engine is sleeping (level {self._sleep_level}); call "
                           "wake_up() first")

    def _require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError("this LLM was created with skip_tokenizer_init=True; pass "
                             "prompts as {'prompt_token_ids': [...]}")
        return self.tokenizer

    def _tokenize(self, prompt: PromptType, index: int) -> tuple[str | None, list[int]]:
        text: str | None
        if isinstance(prompt, str):
            text, ids = prompt, self._require_tokenizer().encode(prompt) if prompt else []
        elif isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            text, ids = prompt.get("prompt"), list(prompt["prompt_token_ids"])
        elif isinstance(prompt, dict) and isinstance(prompt.get("prompt"), str):
            text = prompt["prompt"]
            ids = self._require_tokenizer().encode(text) if text else []
        else:
            raise TypeError(f"prompt {index} must be a str or a dict with 'prompt' or "
                            f"'prompt_token_ids', got {type(prompt).__name__}")
        check_prompt(self.config, ids, f"prompt {index}")
        return text, ids

    def _add_request(self, prompt: str | None, ids: list[int], params: SamplingParams,
                     lora_request: LoRARequest | None = None) -> str:
        request_id = str(next(self._counter))
        child_ids = child_request_ids(request_id, params.n)
        self.output_processor.add_request(request_id, child_ids, prompt, ids, params)
        eos = self.config.model_config.eos_token_ids
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos = tuple(dict.fromkeys((*eos, self.tokenizer.eos_token_id)))
        for req in make_requests(self.config, request_id, ids, params, eos, lora_request):
            self.engine_core.add_request(req)
        return request_id

    def _run(self, request_ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(request_ids), desc="Processed prompts", dynamic_ncols=True,
                   disable=not use_tqdm)
        start = time.perf_counter()
        in_toks = out_toks = 0
        try:
            while self.engine_core.has_unfinished_requests():
                outputs = self.engine_core.step()
                finished, to_abort = self.output_processor.process_outputs(outputs)
                if to_abort:
                    self.engine_core.abort_requests(to_abort)
                for ro in finished:
                    results[ro.request_id] = ro
                    in_toks += len(ro.prompt_token_ids)
                    out_toks += sum(len(o.token_ids) for o in ro.outputs)
                if finished and use_tqdm:
                    elapsed = max(time.perf_counter() - start, 1e-9)
                    bar.set_postfix_str(f"est. speed input: {in_toks / elapsed:.2f} toks/s, "
                                        f"output: {out_toks / elapsed:.2f} toks/s")
                    bar.update(len(finished))
        except BaseException:
            pending = list(self.output_processor.children)
            self.output_processor.abort(pending)
            self.engine_core.abort_requests(pending)
            raise
        finally:
            bar.close()
        return [results[r] for r in request_ids]

    # ---- engine methods ---------------------------------------------------------------
    # Every method declared in engine/protocol.py passes through to the engine client; these
    # two also track the sleep state, so that generate() fails early on a sleeping engine.
    def sleep(self, level: int = 1) -> None:
        """Frees the KV cache (level 1) and the weights too (level 2) until wake_up()."""
        self.engine_core.sleep(level)
        if self._sleep_level is None:  # a sleeping engine ignores a second sleep()
            self._sleep_level = level

    def wake_up(self, tags: list[str] | None = None) -> None:
        self.engine_core.wake_up(tags)
        if not tags:  # all of it is awake; after some tags, generate() asks the engine
            self._sleep_level = None

    # ---- elastic data parallel --------------------------------------------------------
    def scale_data_parallel(self, new_data_parallel_size: int, drain_timeout: float = 120.0,
                            startup_timeout: float = 120.0) -> None:
        """Grows or shrinks the number of engine cores (processes, or Ray actors). Requests
        still on an engine being removed after drain_timeout seconds move to the others; new
        engines that have not started within startup_timeout seconds fail the scale
        (ScaleError), and the fleet stays as it was. Needs engine processes:
        LLM(..., engine_process=True) or data_parallel_size > 1."""
        scale = getattr(self.engine_core, "scale_data_parallel", None)
        if scale is None:
            raise ValueError("this LLM runs its engine core in-process; create it with "
                             "engine_process=True (or data_parallel_size > 1) to scale it")
        scale(new_data_parallel_size, drain_timeout, startup_timeout)

    @property
    def data_parallel_size(self) -> int:
        engines = getattr(self.engine_core, "engines", None)
        return 1 if engines is None else len(engines)

    def get_stats(self) -> dict[str, float]:
        return self.engine_core.stats()

    def shutdown(self) -> None:
        finalizer = getattr(self, "_finalizer", None)
        if finalizer is not None:
            finalizer()  # the engine core's shutdown, unless it already ran
        self.engine_core = None

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
