"""One EngineConfig of small frozen dataclasses, validated once, at the edge."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleetllm.distributed.kv_transfer.config import KVTransferConfig
from fleetllm.errors import ConfigurationError, ModelLoadError

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)
DTYPES = ("auto", "float32", "bfloat16", "float16")
LOAD_FORMATS = ("auto", "safetensors", "dummy", "sharded_state")
ROPE_TYPES = ("default", "linear", "llama3")
# Share of the available RAM the KV cache takes when kv_cache_memory_bytes is not given.
DEFAULT_KV_CACHE_RAM_FRACTION = 0.2
# How long one execute_model call may run before its workers count as hung. A cold first
# step of a large model on a slow CPU takes tens of seconds; a hang is forever. Ten minutes
# never fires on a merely slow machine, and still ends a stuck collective.
DEFAULT_EXECUTE_MODEL_TIMEOUT_S = 600.0
# Worker (and engine-core) restarts allowed within RESTART_WINDOW_S before the engine dies.
DEFAULT_MAX_WORKER_RESTARTS = 3
RESTART_WINDOW_S = 600.0


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from e


def _dtype_name(value: Any) -> str:
    name = str(value).removeprefix("torch.")
    aliases = {"float": "float32", "half": "float16", "bf16": "bfloat16", "fp16": "float16",
               "fp32": "float32"}
    return aliases.get(name, name)


def _rope(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """Normalises classic (rope_theta + rope_scaling) and transformers-5 (rope_parameters)."""
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and params:
        theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
        scaling: dict[str, Any] | None = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = float(hf.get("rope_theta", 10000.0))
        scaling = dict(hf["rope_scaling"]) if hf.get("rope_scaling") else None
    if scaling is not None:
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise ConfigurationError(
                f"rope scaling type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}"
            )
        scaling["rope_type"] = rope_type
        if rope_type == "default":
            scaling = None
    return theta, scaling


@dataclass(frozen=True)
class ModelConfig:
    """The model as the engine needs it, read from a Hugging Face directory."""

    model: str
    architecture: str
    dtype: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    max_model_len: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    sliding_window: int | None
    eos_token_ids: tuple[int, ...]
    generation_config: dict[str, Any]
    seed: int = 0
    skip_tokenizer_init: bool = False
    max_logprobs: int = 20

    @staticmethod
    def from_pretrained(model: str, dtype: str = "auto", max_model_len: int | None = None,
                        seed: int = 0, skip_tokenizer_init: bool = False) -> ModelConfig:
        path = Path(model)
        if not path.is_dir():
            raise ModelLoadError(
                f"model directory {model!r} does not exist; pass the path of a local "
                "Hugging Face checkpoint (a folder with config.json)"
            )
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise ModelLoadError(f"{cfg_path} is missing: a checkpoint needs its config.json")
        hf = _read_json(cfg_path)
        archs = hf.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ModelLoadError(
                f"{cfg_path}: architecture {archs or hf.get('model_type')} is not supported; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if dtype not in DTYPES:
            raise ConfigurationError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}")
        ckpt_dtype = _dtype_name(hf.get("dtype") or hf.get("torch_dtype") or "float32")
        if ckpt_dtype not in DTYPES[1:]:
            ckpt_dtype = "float32"
        try:
            hidden = int(hf["hidden_size"])
            heads = int(hf["num_attention_heads"])
            kv_heads = int(hf.get("num_key_value_heads") or heads)
            head_dim = int(hf.get("head_dim") or hidden // heads)
            layers = int(hf["num_hidden_layers"])
            vocab = int(hf["vocab_size"])
            inter = int(hf["intermediate_size"])
        except KeyError as e:
            raise ModelLoadError(f"{cfg_path} lacks the field {e.args[0]!r}") from e
        if heads % kv_heads:
            raise ModelLoadError(
                f"{cfg_path}: num_attention_heads ({heads}) is not a multiple of "
                f"num_key_value_heads ({kv_heads})"
            )
        theta, scaling = _rope(hf)
        max_pos = int(hf.get("max_position_embeddings", 2048))
        if max_model_len is None:
            max_model_len = max_pos
        elif max_model_len < 2:
            raise ConfigurationError(f"max_model_len={max_model_len} must be at least 2")
        elif max_model_len > max_pos and scaling is None:
            raise ConfigurationError(
                f"max_model_len={max_model_len} is longer than the model's "
                f"max_position_embeddings={max_pos}; use at most {max_pos}"
            )
        sliding = None
        if arch == "MistralForCausalLM":
            sliding = hf.get("sliding_window")
        elif hf.get("use_sliding_window"):
            raise ConfigurationError(f"{cfg_path}: use_sliding_window=true is not supported for {arch}")
        gen: dict[str, Any] = {}
        gen_path = path / "generation_config.json"
        if gen_path.is_file():
            gen = _read_json(gen_path)
        eos: list[int] = []
        for src in (gen.get("eos_token_id"), hf.get("eos_token_id")):
            for tok in (src if isinstance(src, list) else [src]):
                if isinstance(tok, int) and tok not in eos:
                    eos.append(tok)
        attention_bias = bool(hf.get("attention_bias", False))
        return ModelConfig(
            model=str(path),
            architecture=arch,
            dtype=ckpt_dtype if dtype == "auto" else dtype,
            vocab_size=vocab,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            intermediate_size=inter,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=max_pos,
            max_model_len=max_model_len,
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=arch == "Qwen2ForCausalLM" or attention_bias,
            o_bias=attention_bias and arch != "Qwen2ForCausalLM",
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qk_norm=arch == "Qwen3ForCausalLM",
            sliding_window=int(sliding) if sliding else None,
            eos_token_ids=tuple(eos),
            generation_config=gen,
            seed=seed,
            skip_tokenizer_init=skip_tokenizer_init,
        )


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    enable_prefix_caching: bool = True
    kv_cache_memory_bytes: int | None = None
    num_gpu_blocks: int | None = None  # filled in by the engine once memory is known


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 2048
    # Schedule step N+1 while step N runs; the worker fills in its own sampled tokens.
    async_scheduling: bool = False


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    distributed_executor_backend: str | type | None = "uni"
    rank: int = 0
    # A class mixed into every worker ("pkg.mod.Class"); its methods are callable by name.
    worker_extension_cls: str | None = None
    # Layers of each pipeline stage (as even as possible unless the user chose); () for pp=1.
    pp_layer_partition: tuple[int, ...] = ()
    # Ray: spread groups (pipeline stages, data-parallel engines) over nodes, or pack them.
    ray_placement: str = "spread"
    # Recovery: restarts allowed per RESTART_WINDOW_S (0 disables recovery), and how long
    # one execute_model call may run before its workers are declared hung.
    max_worker_restarts: int = DEFAULT_MAX_WORKER_RESTARTS
    execute_model_timeout_s: float = DEFAULT_EXECUTE_MODEL_TIMEOUT_S

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


@dataclass(frozen=True)
class LoadConfig:
    load_format: str = "auto"


@dataclass(frozen=True)
class DeviceConfig:
    device: str = "cpu"


SPEC_METHODS = ("ngram",)


@dataclass(frozen=True)
class SpeculativeConfig:
    """N-gram speculative decoding (vLLM's names): drafts of up to num_speculative_tokens
    tokens copied from the context after its longest suffix match of prompt_lookup_min to
    prompt_lookup_max tokens, verified by the target model in one step."""

    method: str = "ngram"
    num_speculative_tokens: int = 3
    prompt_lookup_min: int = 2
    prompt_lookup_max: int = 5

    @staticmethod
    def from_user(value: dict[str, Any] | str | None) -> SpeculativeConfig | None:
        """From LLM(speculative_config={...}) or the CLI's JSON; None turns it off."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ConfigurationError(f"speculative_config is not valid JSON ({e}); give "
                                         'e.g. \'{"method": "ngram", "num_speculative_tokens": 4}\'') from e
        if not isinstance(value, dict):
            raise ConfigurationError(f"speculative_config={value!r} must be a dict (JSON object)")
        names = {f.name for f in dataclasses.fields(SpeculativeConfig)}
        if unknown := sorted(set(value) - names):
            raise ConfigurationError(f"speculative_config has unknown keys {unknown}; known: "
                                     f"{sorted(names)}")
        if value.get("method", "ngram") not in SPEC_METHODS:
            raise ConfigurationError(f"speculative_config method={value['method']!r} is not "
                                     f"supported; supported: {', '.join(SPEC_METHODS)}")
        cfg = SpeculativeConfig(**value)
        for name in names - {"method"}:
            _positive(f"speculative_config {name}", getattr(cfg, name))
        if cfg.prompt_lookup_min > cfg.prompt_lookup_max:
            raise ConfigurationError(
                f"speculative_config prompt_lookup_min={cfg.prompt_lookup_min} is larger than "
                f"prompt_lookup_max={cfg.prompt_lookup_max}; lower it or raise the maximum")
        return cfg


@dataclass(frozen=True)
class LoRAConfig:
    """Multi-LoRA serving (None in EngineConfig: off). max_loras adapters sit in slots next
    to the weights, so at most that many distinct adapters run in one step; max_cpu_loras
    stay loaded in host memory (LRU, pinned ones exempt)."""

    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int = 1


@dataclass(frozen=True)
class EngineConfig:
    model_config: ModelConfig
    cache_config: CacheConfig = field(default_factory=CacheConfig)
    scheduler_config: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel_config: ParallelConfig = field(default_factory=ParallelConfig)
    load_config: LoadConfig = field(default_factory=LoadConfig)
    device_config: DeviceConfig = field(default_factory=DeviceConfig)
    speculative_config: SpeculativeConfig | None = None
    lora_config: LoRAConfig | None = None
    kv_transfer_config: KVTransferConfig | None = None

    def replace(self, **changes: Any) -> EngineConfig:
        return dataclasses.replace(self, **changes)


def check_parallel_sizes(mc: ModelConfig, tp: int, pp: int) -> None:
    """Tensor parallel splits heads and MLP columns; pipeline parallel splits layers."""
    heads, kv, inter, layers = (mc.num_attention_heads, mc.num_key_value_heads,
                                mc.intermediate_size, mc.num_hidden_layers)

    def tp_ok(t: int) -> bool:
        return heads % t == 0 and inter % t == 0 and (kv % t == 0 or t % kv == 0)

    if not tp_ok(tp):
        good = [t for t in range(1, heads + 1) if tp_ok(t)]
        raise ConfigurationError(
            f"tensor_parallel_size={tp} does not split this model evenly (num_attention_heads="
            f"{heads}, num_key_value_heads={kv}, intermediate_size={inter}); sizes that work: "
            f"{good}"
        )
    if pp > layers:
        raise ConfigurationError(
            f"pipeline_parallel_size={pp} is more stages than the model has layers "
            f"(num_hidden_layers={layers}); use at most {layers}")


def get_pp_partition(num_layers: int, pp: int, partition: str | None = None
                     ) -> tuple[int, ...]:
    """Layers per pipeline stage. By default as even as possible, the remainder going one
    layer each to the stages before the last, from the last backwards (vLLM's
    get_pp_indices: the last stage also holds the final norm and the LM head); or the
    user's "2,1", which must add up to num_layers with at least one layer per stage."""
    if partition is None:
        parts = [num_layers // pp] * pp
        for i in range(2, num_layers % pp + 2):
            parts[-i] += 1
        return tuple(parts) if pp > 1 else ()
    try:
        parts = [int(p) for p in str(partition).split(",")]
    except ValueError:
        raise ConfigurationError(
            f"pp_layer_partition={partition!r} must be comma-separated layer counts, e.g. "
            f"'2,1'") from None
    if len(parts) != pp or sum(parts) != num_layers or min(parts) < 1:
        raise ConfigurationError(
            f"pp_layer_partition={partition!r} must give {pp} stages (pipeline_parallel_size) "
            f"at least one layer each, adding up to num_hidden_layers={num_layers}; it gives "
            f"{len(parts)} stages and {sum(parts)} layers")
    return tuple(parts) if pp > 1 else ()


def _positive(name: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ConfigurationError(f"{name}={value!r} must be a positive integer")


@dataclass
class EngineArgs:
    """User-facing arguments (LLM(...) keywords and CLI flags) turned into one EngineConfig."""

    model: str | None = None
    dtype: str = "auto"
    seed: int = 0
    max_model_len: int | None = None
    block_size: int = 16
    enable_prefix_caching: bool = True
    load_format: str = "auto"
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    kv_cache_memory_bytes: int | None = None
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    distributed_executor_backend: str | type | None = None
    device: str = "auto"
    skip_tokenizer_init: bool = False
    max_logprobs: int = 20
    async_scheduling: bool = False
    worker_extension_cls: str | None = None
    pp_layer_partition: str | None = None
    ray_placement: str = "spread"
    max_worker_restarts: int = DEFAULT_MAX_WORKER_RESTARTS
    execute_model_timeout_s: float = DEFAULT_EXECUTE_MODEL_TIMEOUT_S
    speculative_config: dict[str, Any] | str | None = None
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None  # None: max_loras
    kv_transfer_config: dict[str, Any] | str | KVTransferConfig | None = None

    def _lora_config(self) -> LoRAConfig | None:
        for name in ("max_loras", "max_lora_rank", "max_cpu_loras"):
            _positive(name, getattr(self, name))
        if not self.enable_lora:
            return None
        cpu = self.max_loras if self.max_cpu_loras is None else self.max_cpu_loras
        if cpu < self.max_loras:
            raise ConfigurationError(
                f"max_cpu_loras={cpu} is fewer than max_loras={self.max_loras}: every adapter "
                "in a slot is also kept in host memory; raise max_cpu_loras or lower max_loras")
        return LoRAConfig(self.max_loras, self.max_lora_rank, cpu)

    def _speculative_config(self) -> SpeculativeConfig | None:
        spec = SpeculativeConfig.from_user(self.speculative_config)
        if spec is not None and self.pipeline_parallel_size > 1:
            raise ConfigurationError(
                "speculative_config does not work with pipeline_parallel_size > 1 (the "
                "batch queue keeps several steps in flight, so drafts would lag); use "
                "tensor_parallel_size instead, or turn speculative decoding off")
        if spec is not None and self.async_scheduling:
            raise ConfigurationError(
                "speculative_config does not work with async_scheduling (the next step is "
                "scheduled before this step's accepted tokens are known); drop one of them")
        return spec

    def _ray_placement(self) -> str:
        if self.ray_placement not in ("spread", "pack"):
            raise ConfigurationError(f"ray_placement={self.ray_placement!r}; choose spread "
                                     "(groups on different nodes) or pack (as few as possible)")
        return self.ray_placement

    def create_engine_config(self) -> EngineConfig:
        if self.model is None:
            from fleetllm.default_model import default_model_path

            self.model = default_model_path()
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens",
                     "kv_cache_memory_bytes", "tensor_parallel_size", "pipeline_parallel_size"):
            _positive(name, getattr(self, name))
        speculative = self._speculative_config()
        if self.load_format not in LOAD_FORMATS:
            raise ConfigurationError(
                f"load_format={self.load_format!r} is not one of {', '.join(LOAD_FORMATS)}"
            )
        if not isinstance(self.seed, int):
            raise ConfigurationError(f"seed={self.seed!r} must be an integer")
        model_config = ModelConfig.from_pretrained(
            os.fspath(self.model), self.dtype, self.max_model_len, self.seed,
            self.skip_tokenizer_init,
        )
        _positive("max_logprobs", self.max_logprobs)
        model_config = dataclasses.replace(
            model_config, max_logprobs=min(self.max_logprobs, model_config.vocab_size))
        check_parallel_sizes(model_config, self.tensor_parallel_size,
                             self.pipeline_parallel_size)
        max_len = model_config.max_model_len
        batched = self.max_num_batched_tokens or max(8192, self.max_num_seqs)
        backend = self.distributed_executor_backend
        world = self.tensor_parallel_size * self.pipeline_parallel_size
        if backend is None:
            backend = "uni" if world == 1 else "mp"
        if backend == "uni" and world > 1:
            raise ConfigurationError(
                f"the 'uni' backend runs one worker, but tensor_parallel_size x "
                f"pipeline_parallel_size = {world}; use distributed_executor_backend='mp' or 'ray'"
            )
        if self.async_scheduling and world > 1:
            raise ConfigurationError(
                "async_scheduling needs a single worker (tensor_parallel_size = "
                "pipeline_parallel_size = 1): ranks that do not sample would not know the "
                "token; pipeline parallel already keeps several steps in flight")
        restarts = self.max_worker_restarts
        if not isinstance(restarts, int) or isinstance(restarts, bool) or restarts < 0:
            raise ConfigurationError(
                f"max_worker_restarts={restarts!r} must be an integer >= 0 (0 disables recovery)")
        timeout = self.execute_model_timeout_s
        if (not isinstance(timeout, (int, float)) or isinstance(timeout, bool)
                or not 0 < timeout < float("inf")):
            raise ConfigurationError(
                f"execute_model_timeout_s={timeout!r} must be a positive number of seconds")
        ext = self.worker_extension_cls
        if ext is not None and (not isinstance(ext, str) or "." not in ext):
            raise ConfigurationError(
                f"worker_extension_cls={ext!r} must be a 'package.module.Class' name")
        device = self.device
        if device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        return EngineConfig(
            model_config=model_config,
            cache_config=CacheConfig(self.block_size, self.enable_prefix_caching,
                                     self.kv_cache_memory_bytes),
            scheduler_config=SchedulerConfig(self.max_num_seqs, batched, max_len,
                                             self.async_scheduling),
            parallel_config=ParallelConfig(self.tensor_parallel_size,
                                           self.pipeline_parallel_size, backend,
                                           worker_extension_cls=ext,
                                           ray_placement=self._ray_placement(),
                                           pp_layer_partition=get_pp_partition(
                                               model_config.num_hidden_layers,
                                               self.pipeline_parallel_size,
                                               self.pp_layer_partition),
                                           max_worker_restarts=restarts,
                                           execute_model_timeout_s=float(timeout)),
            load_config=LoadConfig(self.load_format),
            device_config=DeviceConfig(device),
            speculative_config=speculative,
            lora_config=self._lora_config(),
            kv_transfer_config=KVTransferConfig.from_user(self.kv_transfer_config),
        )
