"""A PEFT LoRA adapter directory, read and checked against the base model.

Every check names the file, field or tensor at fault and what to change, as a
LoRAAdapterError: the engine refuses that adapter and goes on serving.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fleetllm.config import ModelConfig
from fleetllm.errors import LoRAAdapterError
from fleetllm.lora.request import LoRARequest

logger = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
LEGACY_WEIGHTS_FILE = "adapter_model.bin"
# The projections an adapter may target, and the block of the decoder layer each lives in.
SUPPORTED_MODULES = {
    "q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
    "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp",
}
_REFUSED_MODULES = ("embed_tokens", "lm_head")
_TENSOR = re.compile(r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(\w+)\.(\w+)"
                     r"\.lora_([AB])(?:\.[\w-]+)?\.weight$")


def module_shapes(mc: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each projection of one decoder layer, unsharded."""
    h, hd, inter = mc.hidden_size, mc.head_dim, mc.intermediate_size
    q, kv = mc.num_attention_heads * hd, mc.num_key_value_heads * hd
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}


@dataclass
class LoRAModel:
    """One adapter in host memory: per (layer, module), A [r, in] and B [out, r] with the
    scaling already folded into B. Only the layers of this pipeline stage are kept."""

    request: LoRARequest
    rank: int
    scaling: float
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]

    @property
    def id(self) -> int:
        return self.request.lora_int_id


class _Checker:
    def __init__(self, request: LoRARequest) -> None:
        self.request = request
        self.where = f"LoRA adapter {request.lora_name!r} (id {request.lora_int_id})"

    def fail(self, problem: str) -> LoRAAdapterError:
        return LoRAAdapterError(f"{self.where}: {problem}")


def _read_config(chk: _Checker, path: Path) -> dict[str, Any]:
    file = path / CONFIG_FILE
    if not file.is_file():
        raise chk.fail(f"{file} is missing; a PEFT adapter directory holds {CONFIG_FILE} and "
                       f"{WEIGHTS_FILE} (save it with PeftModel.save_pretrained)")
    try:
        cfg = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise chk.fail(f"{file} is not valid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise chk.fail(f"{file} must hold a JSON object")
    return cfg


def _rank_and_scaling(chk: _Checker, cfg: dict[str, Any], file: Path,
                      max_rank: int) -> tuple[int, float]:
    peft_type = cfg.get("peft_type", "LORA")
    if str(peft_type).upper() != "LORA":
        raise chk.fail(f"{file}: peft_type={peft_type!r}; only LORA adapters are served")
    r = cfg.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise chk.fail(f"{file}: field 'r'={r!r} must be a positive integer (the LoRA rank)")
    if r > max_rank:
        raise chk.fail(f"{file}: r={r} is more than max_lora_rank={max_rank}; start the "
                       f"engine with max_lora_rank >= {r} (--max-lora-rank {r})")
    alpha = cfg.get("lora_alpha", 8)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise chk.fail(f"{file}: field 'lora_alpha'={alpha!r} must be a number")
    for key, what in (("use_dora", "DoRA adapters"), ("modules_to_save", "modules_to_save "
                      "(fully trained copies of base modules)"),
                      ("rank_pattern", "per-module ranks (rank_pattern)"),
                      ("alpha_pattern", "per-module alphas (alpha_pattern)")):
        if cfg.get(key):
            raise chk.fail(f"{file}: {what} are not supported; retrain without {key!r}")
    if cfg.get("bias", "none") != "none":
        raise chk.fail(f"{file}: bias={cfg['bias']!r} (trained biases) is not supported; "
                       "retrain with bias='none'")
    scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    return r, float(scaling)


def _check_targets(chk: _Checker, cfg: dict[str, Any], file: Path, arch: str) -> None:
    targets = cfg.get("target_modules")
    if isinstance(targets, str):  # a regular expression: the tensors tell what it matched
        return
    for name in targets or []:
        leaf = str(name).rsplit(".", 1)[-1]
        if leaf in _REFUSED_MODULES:
            raise chk.fail(f"{file}: target_modules includes {name!r}; adapters on the "
                           "embeddings or the LM head are not supported; retrain without it")
        if leaf not in SUPPORTED_MODULES:
            raise chk.fail(f"{file}: target_modules includes {name!r}, which this model "
                           f"({arch}) does not have; use any of {', '.join(SUPPORTED_MODULES)}")


def _check_base_model(chk: _Checker, cfg: dict[str, Any], mc: ModelConfig) -> None:
    base = cfg.get("base_model_name_or_path")
    if not base:
        return
    ours = Path(mc.model)
    same = Path(str(base)).name.lower() == ours.name.lower()
    try:
        same = same or Path(str(base)).resolve() == ours.resolve()
    except OSError:
        pass
    if not same:
        logger.warning("%s was trained on base model %r, but this engine serves %r; its "
                       "outputs may be meaningless if the base models differ", chk.where, base,
                       mc.model)


def _open_weights(chk: _Checker, path: Path) -> tuple[dict[str, tuple[int, ...]], Any]:
    """(tensor shapes by name, a function reading one tensor)."""
    st = path / WEIGHTS_FILE
    if st.is_file():
        from safetensors import safe_open

        try:
            handle = safe_open(str(st), framework="pt")
            shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}
        except Exception as e:  # noqa: BLE001 - a corrupt file is the user's to fix
            raise chk.fail(f"{st} cannot be read as safetensors ({e})") from e
        return shapes, handle.get_tensor
    legacy = path / LEGACY_WEIGHTS_FILE
    if legacy.is_file():
        try:
            tensors = torch.load(legacy, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise chk.fail(f"{legacy} cannot be read ({e}); re-save the adapter with "
                           "safe_serialization=True") from e
        return {k: tuple(v.shape) for k, v in tensors.items()}, tensors.__getitem__
    raise chk.fail(f"{st} is missing; save the adapter's weights with "
                   "PeftModel.save_pretrained (safetensors)")


def _plan(chk: _Checker, shapes: dict[str, tuple[int, ...]], file: Path, mc: ModelConfig,
          rank: int) -> dict[tuple[int, str], dict[str, str]]:
    """Checks every tensor's name and shape; returns {(layer, module): {"A": name, ...}}."""
    expected = module_shapes(mc)
    plan: dict[tuple[int, str], dict[str, str]] = {}
    for name, shape in shapes.items():
        if any(f"{m}." in name or name.endswith(m) for m in _REFUSED_MODULES) or (
                "lora_embedding" in name):
            raise chk.fail(f"{file}: tensor {name!r} adapts the embeddings or the LM head, "
                           "which is not supported; retrain without embed_tokens/lm_head in "
                           "target_modules")
        m = _TENSOR.match(name)
        if m is None:
            raise chk.fail(f"{file}: tensor {name!r} is not a LoRA A/B weight of a decoder "
                           "layer projection; only lora_A/lora_B weights of "
                           f"{', '.join(SUPPORTED_MODULES)} are supported")
        layer, block, module, ab = int(m[1]), m[2], m[3], m[4]
        if SUPPORTED_MODULES.get(module) != block:
            raise chk.fail(f"{file}: tensor {name!r} targets {block}.{module}, which this "
                           f"model ({mc.architecture}) does not have; use any of "
                           f"{', '.join(SUPPORTED_MODULES)}")
        if layer >= mc.num_hidden_layers:
            raise chk.fail(f"{file}: tensor {name!r} is for layer {layer}, but the base model "
                           f"has {mc.num_hidden_layers} layers; the adapter was trained for "
                           "another base model")
        fan_in, fan_out = expected[module]
        want = (rank, fan_in) if ab == "A" else (fan_out, rank)
        if tuple(shape) != want:
            what = "r x in_features" if ab == "A" else "out_features x r"
            raise chk.fail(f"{file}: tensor {name!r} has shape {list(shape)}, but r={rank} "
                           f"and this model's {module} need {list(want)} ({what}); the "
                           "adapter was trained for another base model, or its r is wrong")
        plan.setdefault((layer, module), {})[ab] = name
    for (layer, module), pair in plan.items():
        if len(pair) != 2:
            missing = "lora_B" if "A" in pair else "lora_A"
            raise chk.fail(f"{file}: layer {layer} {module} has no {missing} weight; "
                           "the file is incomplete")
    if not plan:
        raise chk.fail(f"{file} holds no LoRA weights")
    return plan


def load_lora_model(request: LoRARequest, mc: ModelConfig, max_rank: int, dtype: torch.dtype,
                    layers: range | None = None) -> LoRAModel:
    """Reads and checks the adapter; keeps the weights of `layers` (default: all)."""
    chk = _Checker(request)
    if not request.lora_path:
        raise chk.fail("lora_path is empty; give the directory of a PEFT adapter")
    path = Path(request.lora_path)
    if not path.is_dir():
        raise chk.fail(f"lora_path {request.lora_path!r} does not exist or is not a "
                       f"directory; give the directory of a PEFT adapter ({CONFIG_FILE} and "
                       f"{WEIGHTS_FILE})")
    cfg = _read_config(chk, path)
    file = path / CONFIG_FILE
    rank, scaling = _rank_and_scaling(chk, cfg, file, max_rank)
    _check_targets(chk, cfg, file, mc.architecture)
    shapes, read = _open_weights(chk, path)
    plan = _plan(chk, shapes, path / WEIGHTS_FILE, mc, rank)
    _check_base_model(chk, cfg, mc)
    layers = layers if layers is not None else range(mc.num_hidden_layers)
    weights = {}
    for (layer, module), names in plan.items():
        if layer not in layers:
            continue
        a = read(names["A"]).to(torch.float32)
        b = read(names["B"]).to(torch.float32) * scaling
        weights[(layer, module)] = (a.to(dtype).contiguous(), b.to(dtype).contiguous())
    return LoRAModel(request, rank, scaling, weights)
